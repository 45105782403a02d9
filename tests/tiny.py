"""Tiny random-weight models and inputs built from configs (no downloads), shared by the tests."""

from __future__ import annotations

import torch
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config,
                          SiglipVisionConfig)

from leanvlm.compat import cache_keyword, cache_of  # noqa: F401 - cache_of is re-exported for the tests

IMAGE_TOKEN = 120
VOCAB = 128
PAD = 0
PATCHES = 16  # 32px images, patch 8 -> 4 x 4


def tiny_llava(text: str = "llama", attn: str = "sdpa", layers: int = 6, seed: int = 0,
               vision_tower: str = "clip", image_size: int = 32) -> LlavaForConditionalGeneration:
    """LLaVA-1.5-shaped model: CLIP tower (with CLS; or SigLIP, without) + Llama or Qwen2 text model with GQA."""
    torch.manual_seed(seed)
    vision_cls = {"clip": CLIPVisionConfig, "siglip": SiglipVisionConfig}[vision_tower]
    vision = vision_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                        image_size=image_size, patch_size=8)
    text_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[text]
    text_config = text_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=PAD, initializer_range=0.2,
                           tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text_config, image_token_index=IMAGE_TOKEN,
                         image_seq_length=(image_size // 8) ** 2, vision_feature_layer=-2,
                         vision_feature_select_strategy="default" if vision_tower == "clip" else "full")
    config._attn_implementation = attn
    model = LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn)
    model.generation_config.eos_token_id = None  # always generate max_new_tokens: comparable lengths
    # a random model may emit the image placeholder id, which no real model does (and uncached steps
    # would then count one placeholder too many)
    model.generation_config.suppress_tokens = [IMAGE_TOKEN]
    return model


def prompt_ids(prefix: int, suffix: int, images: int = 1, seed: int = 0) -> list[int]:
    """A prompt: `prefix` text tokens, the image placeholders, `suffix` question tokens."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, IMAGE_TOKEN, (prefix + suffix,), generator=g).tolist()
    return text[:prefix] + [IMAGE_TOKEN] * (PATCHES * images) + text[prefix:]


def batch_inputs(prompts: list[list[int]], seed: int = 0, images_per_prompt: int = 1) -> dict[str, torch.Tensor]:
    """Left-padded batch with random pixels, one image per prompt."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(len(prompts) * images_per_prompt, 3, 32, 32, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def select(inputs: dict[str, torch.Tensor], row: int, images_per_prompt: int = 1) -> dict[str, torch.Tensor]:
    """One sample of a batch, without its left padding."""
    keep = inputs["attention_mask"][row].bool()
    return {
        "input_ids": inputs["input_ids"][row, keep][None],
        "attention_mask": inputs["attention_mask"][row, keep][None],
        "pixel_values": inputs["pixel_values"][row * images_per_prompt:(row + 1) * images_per_prompt],
    }



def with_cache(model, cache) -> dict:
    """{name: cache} for `model`'s forward, under the cache parameter the installed transformers names."""
    return {cache_keyword(model.forward): cache}


#: generate kwargs of the cached == uncached checks: greedy, with the per-step logits
GENERATE_LOGITS = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)


def assert_cached_equals_uncached(model, inputs: dict, max_new_tokens: int = 8):
    """Generate with and without the KV cache (under whatever method is applied to `model`): the same tokens
    and per-step logits (atol = rtol = 1e-4). -> the cached generate output."""
    cached = model.generate(**inputs, max_new_tokens=max_new_tokens, **GENERATE_LOGITS)
    uncached = model.generate(**inputs, max_new_tokens=max_new_tokens, use_cache=False, **GENERATE_LOGITS)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    return cached

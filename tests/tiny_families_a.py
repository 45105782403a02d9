"""Tiny random-weight LLaVA-NeXT, Gemma 3 and InternVL models (issue 18, wave 2a), and their inputs.

Built from configs like tests/tiny_families.py (same prompt parts, token ids and padding): no downloads,
no processors; placeholder counts follow the models' own helpers / configs. All three take images only.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)

from tiny_families import (IMAGE, PAD, PINPOINTS, TILE, VISION_END, VISION_START, VOCAB, Family, Visual, _finish,
                           _LlavaStyle, _left_pad, _pixels, _random_text, _text_config)

GEMMA_SIDE = 16  # Gemma 3: 16 px images, patch 2 -> 8 x 8 patches, pooled 2 x 2 -> 4 x 4 = 16 tokens an image
INTERN_SIDE = 16  # InternVL: 16 px tiles, patch 2 -> 8 x 8 patches (+ CLS), pixel-shuffled -> 4 x 4 = 16 tokens


class LlavaNext(_LlavaStyle):
    """LLaVA-NeXT: CLIP anyres tiles + newline tokens (the image path of tests/tiny_families.LlavaNextVideo)."""

    name = "llava_next"
    model_class = LlavaNextForConditionalGeneration
    videos = mixed = False

    def _config(self, layers: int):
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=TILE, patch_size=4, projection_dim=32)
        return LlavaNextConfig(vision_config=vision, text_config=_text_config(LlamaConfig, layers),
                               image_token_index=IMAGE, image_grid_pinpoints=PINPOINTS,
                               vision_feature_layer=-2, vision_feature_select_strategy="default")


class _GridFamily(Family):
    """Families with one fixed token grid per image / tile; `Visual.frames` = tiles of an image (InternVL)."""

    videos = mixed = False
    side = 16  # image / tile side in pixels
    type_ids = False  # also return token_type_ids (1 on image tokens)

    def _config(self, layers: int):
        raise NotImplementedError

    def build(self, attn: str = "sdpa", layers: int = 4, seed: int = 0):
        torch.manual_seed(seed)
        config = self._config(layers)
        config._attn_implementation = attn
        return _finish(self.model_class(config), attn)

    def tokens_per_frame(self, model, visual: Visual) -> int:
        """LLM tokens of one image (Gemma 3) / tile (InternVL), as the config says."""
        config = model.config
        return int(getattr(config, "mm_tokens_per_image", None) or config.image_seq_length)

    def inputs(self, model, prompts: list[list], seed: int = 0) -> dict[str, torch.Tensor]:
        rows, pixels = [], []
        for prompt_index, prompt in enumerate(prompts):
            g = torch.Generator().manual_seed(seed * 1000 + prompt_index)
            row = []
            for part in prompt:
                if isinstance(part, int):
                    row += _random_text(part, g)
                    continue
                pixels.append(_pixels(part.seed, part.frames, 3, self.side, self.side))
                row += [VISION_START] + [IMAGE] * (part.frames * self.tokens_per_frame(model, part)) + [VISION_END]
            rows.append(row)
        out = _left_pad(rows)
        if self.type_ids:
            out["token_type_ids"] = (out["input_ids"] == IMAGE).long()
        if pixels:
            out["pixel_values"] = torch.cat(pixels)
        return out


class Gemma3(_GridFamily):
    """Gemma 3: SigLIP + average-pool projector; sliding (window 24) and global layers, so the prompts of
    the tests (~40-80 tokens) exceed the window; bidirectional attention among an image's tokens."""

    name = "gemma3"
    model_class = Gemma3ForConditionalGeneration
    side = GEMMA_SIDE
    type_ids = True
    sliding_window = 24
    global_every = 2  # layer i is global when (i + 1) % global_every == 0 (the real 4B: every 6th)

    def _config(self, layers: int):
        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    image_size=GEMMA_SIDE, patch_size=2, vision_use_head=False)
        text = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=1024,
                                pad_token_id=PAD, initializer_range=0.2, query_pre_attn_scalar=16,
                                sliding_window=self.sliding_window,
                                layer_types=["full_attention" if (i + 1) % self.global_every == 0 else "sliding_attention"
                                             for i in range(layers)])
        return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=16, image_token_index=IMAGE,
                            boi_token_index=VISION_START, eoi_token_index=VISION_END, tie_word_embeddings=False)

    def build(self, attn: str = "sdpa", layers: int = 4, seed: int = 0):
        model = super().build(attn, layers, seed)
        # random init leaves the projector at zero (all image features equal) and every q / k norm weight at
        # zero (so every key has the same norm, as no trained model does): give them random weights
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.5, generator=generator)
            for name, parameter in model.model.language_model.named_parameters():
                if name.endswith(("q_norm.weight", "k_norm.weight")):
                    parameter.normal_(0, 0.5, generator=generator)
        return model


class InternVL(_GridFamily):
    """InternVL: InternViT (CLS token, layer scale) + pixel shuffle 0.5 + MLP projector; an image is
    `Visual.frames` tiles."""

    name = "internvl"
    model_class = InternVLForConditionalGeneration
    side = INTERN_SIDE

    def _config(self, layers: int):
        vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      image_size=[INTERN_SIDE, INTERN_SIDE], patch_size=[2, 2], use_qk_norm=True,
                                      layer_scale_init_value=1.0)
        return InternVLConfig(vision_config=vision, text_config=_text_config(Qwen2Config, layers), image_token_id=IMAGE,
                              image_seq_length=16, downsample_ratio=0.5, vision_feature_layer=-1,
                              vision_feature_select_strategy="default")


def tiles(seed: int, count: int) -> Visual:
    """An InternVL image cut into `count` tiles (e.g. 2 tiles + the thumbnail = 3)."""
    return Visual("image", seed, (INTERN_SIDE, INTERN_SIDE), count)


FAMILIES_A: dict[str, Family] = {f.name: f for f in (LlavaNext(), Gemma3(), InternVL())}

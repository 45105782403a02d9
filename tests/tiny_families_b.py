"""Tiny random-weight Qwen3-VL (+ MoE), Idefics3 and SmolVLM models built from configs, and their inputs.

Same conventions as tests/tiny_families.py (a prompt is a list of ints = random text tokens and `Visual`s).
- Qwen3-VL: a video is one placeholder run PER TEMPORAL FRAME, each after two "timestamp" text tokens
  (`<t> <vision_start> frame <vision_end>`), as Qwen3-VL's processor lays it out; DeepStack features are
  injected after decoder layers 0 and 1 (vision blocks 0 and 1), so in-LLM drops at layer 0 or 1 hit them.
- Idefics3 / SmolVLM: an image is split into rows x cols tiles plus a global tile; every tile is a run of
  `image_seq_len` placeholders between `<fake_token_around_image>` and a row/column text token
  (`<row_i_col_j>`, `<global-img>`), as their processors lay it out. Visual.size = (rows, cols) of tiles
  ((1, 1): no splitting, the global tile only).
"""

from __future__ import annotations

import torch
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    LlamaConfig,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)

from tiny_families import (IMAGE, QWEN_PATCH, VIDEO, VISION_END, VISION_START, Family, Visual, _Qwen, _finish,
                           _left_pad, _pixels, _random_text, _text_config)

FAKE_AROUND = 124  # <fake_token_around_image>
GLOBAL_IMG = 125  # <global-img>
ROW_COL = 126  # <row_i_col_j>: one id for all of them is enough for the model (the processor uses one per tile)
IDEFICS_TILE = 24  # tile side in pixels; patch 4 -> 6 x 6 patches, scale factor 2 -> 3 x 3 = 9 tokens a tile


class Qwen3VL(_Qwen):
    name = "qwen3_vl"
    config_class = Qwen3VLConfig
    model_class = Qwen3VLForConditionalGeneration

    def _text(self, layers: int) -> dict:
        text = _text_config(LlamaConfig, layers).to_dict()
        keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "max_position_embeddings", "pad_token_id", "initializer_range")
        text = {key: text[key] for key in keep}
        text["head_dim"] = 16
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                   "mrope_interleaved": True}
        return text

    def _vision(self) -> dict:
        return dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=QWEN_PATCH,
                    spatial_merge_size=2, temporal_patch_size=2, in_channels=3, out_hidden_size=64,
                    num_position_embeddings=16, deepstack_visual_indexes=[0, 1])

    def build(self, attn: str = "sdpa", layers: int = 4, seed: int = 0):
        torch.manual_seed(seed)
        config = self.config_class(text_config=self._text(layers), vision_config=self._vision(), image_token_id=IMAGE,
                                   video_token_id=VIDEO, vision_start_token_id=VISION_START,
                                   vision_end_token_id=VISION_END, tie_word_embeddings=False)
        config._attn_implementation = attn
        model = self.model_class(config)
        # q / k norm weights start at one, so every key would have the same norm (as no trained model does)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, parameter in model.model.language_model.named_parameters():
                if name.endswith(("q_norm.weight", "k_norm.weight")):
                    parameter.copy_(1 + 0.5 * torch.randn(parameter.shape, generator=generator))
        return _finish(model, attn)

    def inputs(self, model, prompts: list[list], seed: int = 0) -> dict[str, torch.Tensor]:
        rows, types = [], []
        pixels = {"image": [], "video": []}
        grids = {"image": [], "video": []}
        width = 3 * 2 * QWEN_PATCH * QWEN_PATCH
        for prompt_index, prompt in enumerate(prompts):
            g = torch.Generator().manual_seed(seed * 1000 + prompt_index)
            row, kind_row = [], []
            for part in prompt:
                if isinstance(part, int):
                    row += _random_text(part, g)
                    kind_row += [0] * part
                    continue
                t = 1 if part.kind == "image" else part.frames // 2
                h, w = part.size
                grids[part.kind].append([t, h, w])
                pixels[part.kind].append(_pixels(part.seed, t * h * w, width))
                per_frame = h * w // 4
                token, kind = (IMAGE, 1) if part.kind == "image" else (VIDEO, 2)
                for _ in range(t):
                    stamp = _random_text(2, g) if part.kind == "video" else []  # "<1.5 seconds>"
                    row += stamp + [VISION_START] + [token] * per_frame + [VISION_END]
                    kind_row += [0] * len(stamp) + [0] + [kind] * per_frame + [0]
            rows.append(row)
            types.append(kind_row)
        out = _left_pad(rows, types)
        if grids["image"]:
            out["pixel_values"] = torch.cat(pixels["image"])
            out["image_grid_thw"] = torch.tensor(grids["image"])
        if grids["video"]:
            out["pixel_values_videos"] = torch.cat(pixels["video"])
            out["video_grid_thw"] = torch.tensor(grids["video"])
        return out


class Qwen3VLMoe(Qwen3VL):
    name = "qwen3_vl_moe"
    config_class = Qwen3VLMoeConfig
    model_class = Qwen3VLMoeForConditionalGeneration

    def _text(self, layers: int) -> dict:
        return {**super()._text(layers), "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                "decoder_sparse_step": 1}


class _Idefics(Family):
    """Idefics3-style: SigLIP-like tower without CLS, pixel shuffle (scale 2), tiles with row/column tokens."""

    config_class = None
    videos = mixed = False

    def build(self, attn: str = "sdpa", layers: int = 4, seed: int = 0):
        torch.manual_seed(seed)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      image_size=IDEFICS_TILE, patch_size=4)
        config = self.config_class(vision_config=vision, text_config=_text_config(LlamaConfig, layers).to_dict(),
                                   image_token_id=IMAGE, scale_factor=2, tie_word_embeddings=False)
        config._attn_implementation = attn
        model = _finish(self.model_class(config), attn)
        model.generation_config.suppress_tokens = [IMAGE, FAKE_AROUND, GLOBAL_IMG, ROW_COL]
        return model

    def tokens_per_frame(self, model, visual: Visual) -> int:
        return model.model.image_seq_len

    def tiles(self, visual: Visual) -> int:
        rows, cols = visual.size
        return 1 if rows * cols == 1 else rows * cols + 1

    def inputs(self, model, prompts: list[list], seed: int = 0) -> dict[str, torch.Tensor]:
        rows, tiles = [], []
        per_tile = model.model.image_seq_len
        for prompt_index, prompt in enumerate(prompts):
            g = torch.Generator().manual_seed(seed * 1000 + prompt_index)
            row, prompt_tiles = [], []
            for part in prompt:
                if isinstance(part, int):
                    row += _random_text(part, g)
                    continue
                n = self.tiles(part)
                prompt_tiles.append(_pixels(part.seed, n, 3, IDEFICS_TILE, IDEFICS_TILE))
                for tile in range(n - 1):  # the split tiles, then the global one
                    row += [FAKE_AROUND, ROW_COL] + [IMAGE] * per_tile
                    if (tile + 1) % part.size[1] == 0:
                        row += _random_text(1, g)  # the processor's "\n" after each tile row
                row += [FAKE_AROUND, GLOBAL_IMG] + [IMAGE] * per_tile + [FAKE_AROUND]
            rows.append(row)
            tiles.append(torch.cat(prompt_tiles) if prompt_tiles else torch.zeros(0, 3, IDEFICS_TILE, IDEFICS_TILE))
        out = _left_pad(rows)
        most = max(t.shape[0] for t in tiles)
        if most:  # (B, max tiles, 3, H, W), padding tiles all zeros (the model drops them)
            pixels = torch.zeros(len(tiles), most, 3, IDEFICS_TILE, IDEFICS_TILE)
            for i, t in enumerate(tiles):
                pixels[i, :t.shape[0]] = t
            out["pixel_values"] = pixels
        return out


class Idefics3(_Idefics):
    name = "idefics3"
    config_class = Idefics3Config
    model_class = Idefics3ForConditionalGeneration


class SmolVLM(_Idefics):
    name = "smolvlm"
    config_class = SmolVLMConfig
    model_class = SmolVLMForConditionalGeneration


FAMILIES_B: dict[str, Family] = {f.name: f for f in (Qwen3VL(), Qwen3VLMoe(), Idefics3(), SmolVLM())}

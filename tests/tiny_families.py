"""Tiny random-weight models of the families leanvlm supports beyond LLaVA-1.5, and their inputs.

Everything is built from configs (no downloads, no processors): input_ids get the placeholder counts the
model expects (computed with the model's own helpers where it has them) and pixel tensors of the right
shapes. A prompt is a list of parts: an int (that many random text tokens) or a `Visual`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaForConditionalGeneration,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    SiglipVisionConfig,
)
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

VOCAB = 128
PAD = 0
IMAGE = 120
VIDEO = 121
VISION_START = 122
VISION_END = 123
TEXT_IDS = (1, IMAGE)  # random text tokens are drawn from [1, IMAGE)

TILE = 24  # LLaVA families: tile side in pixels; patch 4 -> 6 x 6 = 36 patches a tile, 3 x 3 = 9 a pooled video frame
PINPOINTS = [[24, 48], [48, 24], [48, 48]]
QWEN_PATCH = 4  # Qwen: patch side; a pixel row holds 3 channels x 2 temporal x 4 x 4


@dataclass(frozen=True)
class Visual:
    """An image or a video. LLaVA families: size = (H, W) pixels of the original image (anyres tiling);
    Qwen: size = (h, w) patch grid (even). frames: video frames (Qwen: even, two per temporal patch)."""

    kind: str
    seed: int
    size: tuple[int, int] = (TILE, TILE)
    frames: int = 1


def image(seed: int, size: tuple[int, int] = (TILE, TILE)) -> Visual:
    return Visual("image", seed, size)


def video(seed: int, frames: int = 4, size: tuple[int, int] = (TILE, TILE)) -> Visual:
    return Visual("video", seed, size, frames)


def _text_config(cls, layers: int, **extra):
    return cls(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=1024, pad_token_id=PAD,
               initializer_range=0.2, tie_word_embeddings=False, **extra)


def _finish(model, attn: str):
    model = model.eval()
    model.set_attn_implementation(attn)
    model.generation_config.eos_token_id = None  # always generate max_new_tokens: comparable lengths
    model.generation_config.pad_token_id = PAD
    # a random model may emit placeholder ids; uncached generation would then re-read them as visual tokens
    model.generation_config.suppress_tokens = [IMAGE, VIDEO, VISION_START, VISION_END]
    return model


def _random_text(count: int, g: torch.Generator) -> list[int]:
    return torch.randint(*TEXT_IDS, (count,), generator=g).tolist()


def _pixels(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _left_pad(rows: list[list[int]], extra: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if extra is not None:
        types = torch.zeros_like(ids, dtype=torch.int)
        for i, row in enumerate(extra):
            types[i, width - len(row):] = torch.tensor(row, dtype=torch.int)
        out["mm_token_type_ids"] = types
    return out


class Family:
    """One model family: `build(attn)` a tiny model, `inputs(model, prompts, seed)` a left-padded batch."""

    name: str = ""
    model_class: type | None = None
    videos: bool = True  # takes videos
    mixed: bool = True  # images and videos in one batch

    def build(self, attn: str = "sdpa", layers: int = 4, seed: int = 0):
        raise NotImplementedError

    def inputs(self, model, prompts: list[list], seed: int = 0) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def tokens_per_frame(self, model, visual: Visual) -> int:
        """Visual (non-newline) LLM tokens of one frame of a video (or an image without tiling)."""
        raise NotImplementedError


class _LlavaStyle(Family):
    """LLaVA-OneVision / LLaVA-NeXT-Video: anyres image tiles packed with newline tokens, pooled video frames."""

    video_newline = True

    def _config(self, layers: int):
        raise NotImplementedError

    def build(self, attn: str = "sdpa", layers: int = 4, seed: int = 0):
        torch.manual_seed(seed)
        config = self._config(layers)
        config._attn_implementation = attn
        return _finish(self.model_class(config), attn)

    def _image_tokens(self, model, visual: Visual, tiles: torch.Tensor) -> int:
        with torch.no_grad():
            features = model.model.get_image_features(pixel_values=tiles, image_sizes=torch.tensor([visual.size]),
                                                      return_dict=True).pooler_output
        return features[0].shape[0]

    def tokens_per_frame(self, model, visual: Visual) -> int:
        return 9  # 6 x 6 patches pooled 2 x 2

    def inputs(self, model, prompts: list[list], seed: int = 0) -> dict[str, torch.Tensor]:
        rows, tiles, sizes, videos = [], [], [], []
        images_per_prompt = [sum(1 for p in prompt if isinstance(p, Visual) and p.kind == "image") for prompt in prompts]
        # LLaVA-OneVision tiles an image only when it is its prompt's only image (`batch_num_images`)
        multi = isinstance(self, OneVision) and max(images_per_prompt) > 1
        for prompt_index, prompt in enumerate(prompts):
            g = torch.Generator().manual_seed(seed * 1000 + prompt_index)
            row = []
            for part in prompt:
                if isinstance(part, int):
                    row += _random_text(part, g)
                elif part.kind == "image":
                    tiled = not multi or images_per_prompt[prompt_index] == 1
                    n = image_size_to_num_patches(part.size, model.config.image_grid_pinpoints, TILE) if tiled else 1
                    pixels = _pixels(part.seed, n, 3, TILE, TILE)
                    tiles.append(pixels)
                    sizes.append(list(part.size))
                    count = self._image_tokens(model, part, pixels) if tiled else (TILE // 4) ** 2 + 1
                    row += [IMAGE] * count
                else:
                    videos.append(_pixels(part.seed, part.frames, 3, TILE, TILE))
                    row += [VIDEO] * (part.frames * self.tokens_per_frame(model, part) + int(self.video_newline))
            rows.append(row)
        out = _left_pad(rows)
        if tiles:
            out["pixel_values"] = torch.cat(tiles)
            out["image_sizes"] = torch.tensor(sizes)
            if multi:
                out["batch_num_images"] = torch.tensor(images_per_prompt)
        if videos:
            out["pixel_values_videos"] = torch.stack(videos)
        return out


class OneVision(_LlavaStyle):
    name = "llava_onevision"
    model_class = LlavaOnevisionForConditionalGeneration

    def _config(self, layers: int):
        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    image_size=TILE, patch_size=4, vision_use_head=False)
        # anyres_max_1: a high-resolution grid above 1.1 x one tile is interpolated down (exercises that path)
        return LlavaOnevisionConfig(vision_config=vision, text_config=_text_config(Qwen2Config, layers),
                                    image_token_index=IMAGE, video_token_index=VIDEO, image_grid_pinpoints=PINPOINTS,
                                    vision_aspect_ratio="anyres_max_1", vision_feature_layer=-1,
                                    vision_feature_select_strategy="full")


class LlavaNextVideo(_LlavaStyle):
    name = "llava_next_video"
    model_class = LlavaNextVideoForConditionalGeneration
    video_newline = False

    def _config(self, layers: int):
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=TILE, patch_size=4, projection_dim=32)
        return LlavaNextVideoConfig(vision_config=vision, text_config=_text_config(LlamaConfig, layers),
                                    image_token_index=IMAGE, video_token_index=VIDEO, image_grid_pinpoints=PINPOINTS,
                                    vision_feature_layer=-2, vision_feature_select_strategy="default",
                                    spatial_pool_mode="average", spatial_pool_stride=2)


class Llava(Family):
    """LLaVA-1.5 (the foundation family of tests/tiny.py): one 4 x 4 patch grid an image, no video."""

    name = "llava"
    model_class = LlavaForConditionalGeneration
    videos = mixed = False

    def build(self, attn: str = "sdpa", layers: int = 4, seed: int = 0):
        from tiny import tiny_llava

        model = tiny_llava("qwen2", attn, layers=layers, seed=seed)
        model.generation_config.pad_token_id = PAD
        model.generation_config.suppress_tokens = [IMAGE]
        return model

    def tokens_per_frame(self, model, visual: Visual) -> int:
        return model.config.image_seq_length

    def inputs(self, model, prompts: list[list], seed: int = 0) -> dict[str, torch.Tensor]:
        rows, pixels = [], []
        side = model.config.vision_config.image_size
        for prompt_index, prompt in enumerate(prompts):
            g = torch.Generator().manual_seed(seed * 1000 + prompt_index)
            row = []
            for part in prompt:
                if isinstance(part, int):
                    row += _random_text(part, g)
                else:
                    pixels.append(_pixels(part.seed, 3, side, side))
                    row += [IMAGE] * self.tokens_per_frame(model, part)
            rows.append(row)
        out = _left_pad(rows)
        if pixels:
            out["pixel_values"] = torch.stack(pixels)
        return out


class _Qwen(Family):
    config_class = None
    model_class = None

    def _vision(self) -> dict:
        raise NotImplementedError

    def build(self, attn: str = "sdpa", layers: int = 4, seed: int = 0):
        torch.manual_seed(seed)
        text = _text_config(Qwen2Config, layers).to_dict()
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        config = self.config_class(text_config=text, vision_config=self._vision(), image_token_id=IMAGE,
                                   video_token_id=VIDEO, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
        config._attn_implementation = attn
        return _finish(self.model_class(config), attn)

    def tokens_per_frame(self, model, visual: Visual) -> int:
        return visual.size[0] * visual.size[1] // 4

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
                count = t * h * w // 4
                token, kind = (IMAGE, 1) if part.kind == "image" else (VIDEO, 2)
                row += [VISION_START] + [token] * count + [VISION_END]
                kind_row += [0] + [kind] * count + [0]
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


class Qwen2VL(_Qwen):
    name = "qwen2_vl"
    config_class = Qwen2VLConfig
    model_class = Qwen2VLForConditionalGeneration

    def _vision(self) -> dict:
        return dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=QWEN_PATCH,
                    spatial_merge_size=2, temporal_patch_size=2, in_channels=3)


class Qwen25VL(_Qwen):
    name = "qwen2_5_vl"
    config_class = Qwen2_5_VLConfig
    model_class = Qwen2_5_VLForConditionalGeneration

    def _vision(self) -> dict:
        # window 16 px = 2 x 2 merge units a window; block 1 attends over the full frame
        return dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=4,
                    patch_size=QWEN_PATCH, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                    window_size=16, fullatt_block_indexes=[1])


FAMILIES: dict[str, Family] = {f.name: f for f in (Llava(), OneVision(), LlavaNextVideo(), Qwen2VL(), Qwen25VL())}

"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): SigLIP tiles packed with image-newline tokens,
videos pooled 2 x 2 per frame with one newline after the video, 1-D RoPE Qwen2 text model.

How the LLM sequence is laid out (transformers' own packing, `pack_image_features` / `get_video_features`):
- an image with anyres tiling (one image in its sample): the base tile's h x w tokens, then the
  high-resolution grid (tiles stitched, unpadded to the aspect ratio, bilinearly shrunk when it exceeds
  `vision_aspect_ratio`) row by row, each row followed by a newline token;
- an image without tiling (several images in one sample, `batch_num_images`): its h x w tokens + 1 newline;
- a video: every frame's pooled tokens (ceil(h/2) x ceil(w/2)), frame after frame, + 1 newline.
Every one of these positions is an image/video placeholder in input_ids.

Design choice: reduce the PACKED features with the newline tokens protected. The adapter takes the model's
own packed output (encoded now, or pre-encoded by `generate`), splits it into frames without the newlines
and hands those to the stages:
- a tiled image is two `VisualItem`s: the base tile (grid h x w) and the high-resolution grid
  (grid h' x w' of the packed grid, i.e. after unpadding/interpolation, the raster the LLM sees);
- an untiled image is one item (grid h x w); a video is one item with one frame per video frame.
The high-resolution item carries `crops` (the tile every grid cell came from, read off the model's own
packing of a tile-indicator dummy), so a stage can budget tile by tile as if each had been its own item
(VisionZip's `per_crop`).
After reduction the placeholder run is rebuilt in the model's order: surviving tokens in raster order and
a newline after the last survivor of every high-resolution row (a row whose tokens all merged away keeps
its newline), the trailing newline of videos / untiled images stays. The newlines are never merged or
dropped: `protected_placeholders` marks them so in-LLM stages do not count them as visual tokens either.
The placeholder count of each run shrinks to exactly the rebuilt features (`shrink_placeholders`), and
1-D positions are renumbered contiguously after the pre-LLM shrink (as for LLaVA-1.5).

Reducing each tile BEFORE packing was rejected: unpadding and interpolation need the full tile grids.

Vision signals come from the encoder layer the projector reads (`vision_feature_layer`); they are packed
(images) and pooled (videos) with the model's own helpers so each token's value matches its grid cell.
SigLIP has no CLS token: the mean token is the substitute query (see `models.vision`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

from leanvlm.models.base import ModelAdapter
from leanvlm.models.vision import VisionProbe, encoder_layers, feature_layer_index, vision_signals
from leanvlm.runtime.visual import ShrunkSequence, VisualItem


@dataclass
class Run:
    """One image / video placeholder run of input_ids, as the model packs it (before any reduction).

    newline [length] bool marks the newline positions of the run; base: tokens of the base tile (0 for
    a video); hires: (h', w') of a tiled image's high-resolution grid (None otherwise); crops [h' * w'] long:
    the high-resolution tile each grid cell came from (None without a grid); frames: video frames.
    """

    kind: str
    index: int  # among the images or among the videos of the batch
    sample: int
    start: int  # row-major flat position of the run's first placeholder
    newline: torch.Tensor
    base: int = 0
    hires: tuple[int, int] | None = None
    crops: torch.Tensor | None = None
    frames: int = 0

    @property
    def length(self) -> int:
        return self.newline.numel()


class OneVisionAdapter(ModelAdapter):
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    family = "llava_onevision"
    #: whether the model appends a newline token after every video
    video_newline = True

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self._rebuilt: tuple[torch.Tensor, torch.Tensor] | None = None  # (input_ids, protected) of the last rebuild

    # --- geometry ------------------------------------------------------------------------------------
    @property
    def _side(self) -> int:
        vision = self.model.config.vision_config
        return vision.image_size // vision.patch_size

    @property
    def _video_side(self) -> int:
        return math.ceil(self._side / 2)  # `apply_pooling`: bilinear to ceil(h / 2) x ceil(w / 2)

    def _strategy(self, kwargs: dict[str, Any]) -> str:
        return self.visual_input(kwargs, "vision_feature_select_strategy") or self.model.config.vision_feature_select_strategy

    def _tiles_per_image(self, kwargs: dict[str, Any], sizes: torch.Tensor) -> list[int]:
        """Tiles (base + high resolution) of every image, as `get_image_features` counts them."""
        counts = self.visual_input(kwargs, "batch_num_images")
        patch = [True] * len(sizes) if counts is None else [int(n) == 1 for n in counts for _ in range(int(n))]
        config = self.model.config
        return [image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size) if p else 1
                for size, p in zip(sizes, patch)]

    def _pack(self, features: list[torch.Tensor], sizes: torch.Tensor, kwargs: dict[str, Any],
              newline: torch.Tensor | None) -> list[torch.Tensor]:
        """The model's own packing of per-image tile features [n_tiles, T, c] (newline [c] or None)."""
        ratio = self.visual_input(kwargs, "vision_aspect_ratio") or self.model.config.vision_aspect_ratio
        packed, _ = self.multimodal_module.pack_image_features(features, sizes, image_newline=newline,
                                                               vision_aspect_ratio=ratio)
        return packed

    def _pool_video_signal(self, values: torch.Tensor) -> torch.Tensor:
        """[B*F, T, c] per-patch values -> [B*F, T', c] pooled like the video features: `apply_pooling`'s
        bilinear resize of the [side, side] grid to [ceil(side / 2)] * 2, bit-identical, but on the
        channels-last view of the values instead of the NCHW copy apply_pooling makes (its interpolation
        then runs over contiguous channels: 240 -> 7 ms for 32 frames of 1152-wide keys)."""
        side = self._side
        grid = values.view(values.shape[0], side, side, -1).permute(0, 3, 1, 2)  # [B*F, c, h, w], channels last
        pooled = nn.functional.interpolate(grid, size=[self._video_side] * 2, mode="bilinear")
        return pooled.permute(0, 2, 3, 1).reshape(values.shape[0], -1, values.shape[-1])

    def _image_features(self, kwargs: dict[str, Any]) -> BaseModelOutputWithPooling:
        return self.multimodal_module.get_image_features(
            pixel_values=kwargs["pixel_values"], image_sizes=kwargs.get("image_sizes"),
            vision_feature_layer=kwargs.get("vision_feature_layer"),
            vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
            batch_num_images=kwargs.get("batch_num_images"), return_dict=True)

    def _video_features(self, kwargs: dict[str, Any]) -> BaseModelOutputWithPooling:
        return self.multimodal_module.get_video_features(
            pixel_values_videos=kwargs["pixel_values_videos"], vision_feature_layer=kwargs.get("vision_feature_layer"),
            vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"), return_dict=True)

    # --- the placeholder runs -------------------------------------------------------------------------
    def _image_layouts(self, kwargs: dict[str, Any]) -> list[tuple[torch.Tensor, int, tuple[int, int] | None, torch.Tensor | None]]:
        """Per image: (newline flags of its run, base tokens, high-resolution grid or None, the tile of every
        grid cell or None), from the image sizes alone: the model's packing applied to a dummy whose channel 0
        marks patches (1; newlines 0) and channel 1 + k is tile k's indicator. Unpadding only crops the
        stitched tiles, so a cell's indicator stays one-hot; where the grid is interpolated down (OneVision's
        `vision_aspect_ratio`) a cell blends up to 4 neighbours and belongs to the tile with the largest weight."""
        sizes = self.visual_input(kwargs, "image_sizes")
        if sizes is None:
            raise ValueError(f"{self.family}: images without `image_sizes`; pass the processor's image_sizes")
        sizes = torch.as_tensor(sizes)
        tokens = self._side ** 2
        layouts = []
        tiles = self._tiles_per_image(kwargs, sizes)
        channels = 1 + max(tiles, default=1)
        dummies = []
        for n in tiles:
            dummy = torch.zeros(n, tokens, channels)  # [tiles, T, 1 + max tiles]
            dummy[:, :, 0] = 1.0
            dummy[torch.arange(n), :, 1 + torch.arange(n)] = 1.0
            dummies.append(dummy)
        packed = self._pack(dummies, sizes, kwargs, torch.zeros(channels))
        for n, marks in zip(tiles, packed):
            newline = marks[:, 0] < 0.5
            if n == 1:
                layouts.append((newline, tokens, None, None))
                continue
            rows = int(newline[tokens:].sum())
            width = (newline.numel() - tokens) // rows - 1
            grid_marks = marks[tokens:][~newline[tokens:]]  # [h' * w', channels], raster order
            crops = grid_marks[:, 2:1 + n].argmax(dim=1)  # high-resolution tiles 1..n-1 -> crops 0..n-2
            layouts.append((newline, tokens, (rows, width), crops))
        return layouts

    def _video_frames(self, kwargs: dict[str, Any]) -> list[int]:
        pixels = self.visual_input(kwargs, "pixel_values_videos")
        if pixels is not None:
            return [pixels.shape[1]] * pixels.shape[0]
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("video")
        if encoded is None:
            return []
        per_frame = self._video_side ** 2
        return [(video.shape[0] - int(self.video_newline)) // per_frame
                for video in self._video_rows(encoded.pooler_output)]

    def _video_rows(self, pooler_output: Any) -> list[torch.Tensor]:
        """Per video [L, C] from the model's video features ([n, L, C] tensor or list of [L, C])."""
        return [v.reshape(-1, v.shape[-1]) for v in pooler_output]

    def _runs(self, kwargs: dict[str, Any]) -> list[Run]:
        """The image and video runs of kwargs["input_ids"], in row-major order (empty without visual input)."""
        input_ids = kwargs["input_ids"]
        mm = kwargs.get("mm_encoder_outputs") or {}
        runs: list[Run] = []
        has_images = self.visual_input(kwargs, "pixel_values") is not None or mm.get("image") is not None
        if has_images:
            for index, (newline, base, hires, crops) in enumerate(self._image_layouts(kwargs)):
                runs.append(Run("image", index, 0, 0, newline, base=base, hires=hires, crops=crops))
        per_frame = self._video_side ** 2
        for index, frames in enumerate(self._video_frames(kwargs)):
            newline = torch.zeros(frames * per_frame + int(self.video_newline), dtype=torch.bool)
            if self.video_newline:
                newline[-1] = True
            runs.append(Run("video", index, 0, 0, newline, frames=frames))
        for kind, token in zip(("image", "video"), self.visual_token_ids):
            of_kind = [run for run in runs if run.kind == kind]
            flat = (input_ids == token).reshape(-1).nonzero().squeeze(1)
            expected = sum(run.length for run in of_kind)
            if flat.numel() != expected:
                raise ValueError(f"{self.family}: input_ids hold {flat.numel()} {kind} placeholders but the {kind} "
                                 f"inputs need {expected}")
            offset = 0
            for run in of_kind:
                run.start = int(flat[offset]) if run.length else 0
                run.sample = run.start // input_ids.shape[1]
                offset += run.length
        return sorted(runs, key=lambda run: run.start)

    # --- pre-LLM -------------------------------------------------------------------------------------
    def has_visual_input(self, kwargs: dict[str, Any]) -> bool:
        mm = kwargs.get("mm_encoder_outputs") or {}
        return any(kwargs.get(k) is not None for k in ("pixel_values", "pixel_values_videos")) or \
            mm.get("image") is not None or mm.get("video") is not None

    def install_vision_probe(self) -> VisionProbe:
        layers = encoder_layers(self.multimodal_module.vision_tower)
        layer = self.model.config.vision_feature_layer
        layer = layer if isinstance(layer, int) else layer[-1]
        return VisionProbe(layers[feature_layer_index(layer, len(layers))])

    def _signals(self, probe: VisionProbe, needs: frozenset[str], kwargs: dict[str, Any], back: int) -> dict[str, torch.Tensor]:
        """Per-patch signals of every tile / frame of one vision forward -> name -> [N, T, c] (c = 1 or D)."""
        has_cls = "siglip" not in type(self.multimodal_module.vision_tower).__name__.lower()
        prefix = 1 if self._strategy(kwargs) == "default" else 0
        signals = vision_signals(probe, needs, has_cls, prefix, back=back)
        return {name: value if value.dim() == 3 else value[..., None] for name, value in signals.items()}

    def encode_visual(self, kwargs: dict[str, Any], needs: frozenset[str], probe: VisionProbe | None) -> list[VisualItem]:
        runs = self._runs(kwargs)
        mm = kwargs.get("mm_encoder_outputs") or {}
        images_encoded, videos_encoded = mm.get("image"), mm.get("video")
        has_videos = any(run.kind == "video" for run in runs)
        image_runs = [run for run in runs if run.kind == "image"]
        image_items: dict[int, list[VisualItem]] = {}
        if image_runs:
            encoded = images_encoded if images_encoded is not None else self._image_features(kwargs)
            # generate encodes images then videos before the first forward: the image capture is one back
            back = 1 if images_encoded is not None and videos_encoded is not None and has_videos else 0
            signals = self._signals(probe, needs, kwargs, back) if needs else {}
            image_items = self._image_items(kwargs, image_runs, encoded.pooler_output, signals)
        video_items: dict[int, list[VisualItem]] = {}
        if has_videos:
            encoded = videos_encoded if videos_encoded is not None else self._video_features(kwargs)
            signals = self._signals(probe, needs, kwargs, 0) if needs else {}
            video_items = self._video_items([run for run in runs if run.kind == "video"], encoded.pooler_output, signals)
        items: list[VisualItem] = []
        for run in runs:
            items += (image_items if run.kind == "image" else video_items)[run.index]
        return items

    def _image_items(self, kwargs: dict[str, Any], runs: list[Run], features: list[torch.Tensor],
                     signals: dict[str, torch.Tensor]) -> dict[int, list[VisualItem]]:
        packed_signals: dict[str, list[torch.Tensor]] = {}
        if signals:
            sizes = torch.as_tensor(self.visual_input(kwargs, "image_sizes"))
            tiles = self._tiles_per_image(kwargs, sizes)
            for name, value in signals.items():
                packed_signals[name] = self._pack(list(torch.split(value, tiles)), sizes, kwargs, None)
        out: dict[int, list[VisualItem]] = {}
        side = self._side
        for run in runs:
            feature = features[run.index]
            if feature.shape[0] != run.length:
                raise ValueError(f"{self.family}: image {run.index} has {feature.shape[0]} features, expected {run.length}")
            tokens = feature[~run.newline.to(feature.device)]
            sig = {name: value[run.index] for name, value in packed_signals.items()}  # [T_total, c]

            def part(values: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
                return values[lo:hi][None].squeeze(-1) if values.shape[-1] == 1 else values[lo:hi][None]

            base = VisualItem.from_frames(tokens[None, :run.base], (side, side), run.sample, "image",
                                          {name: part(v, 0, run.base) for name, v in sig.items()})
            out[run.index] = [base]
            if run.hires is not None:
                out[run.index].append(VisualItem.from_frames(
                    tokens[None, run.base:], run.hires, run.sample, "image",
                    {name: part(v, run.base, tokens.shape[0]) for name, v in sig.items()},
                    crops=run.crops.to(feature.device)))
        return out

    def _video_items(self, runs: list[Run], features: Any, signals: dict[str, torch.Tensor]) -> dict[int, list[VisualItem]]:
        rows = self._video_rows(features)
        pooled = {name: self._pool_video_signal(value) for name, value in signals.items()}  # [B*F, T', c]
        side = self._video_side
        out: dict[int, list[VisualItem]] = {}
        start = 0
        for run in runs:
            video = rows[run.index]
            frames = video[: run.frames * side * side].reshape(run.frames, side * side, -1)
            sig = {}
            for name, value in pooled.items():
                v = value[start:start + run.frames]
                sig[name] = v.squeeze(-1) if name != "keys" else v
            start += run.frames
            out[run.index] = [VisualItem.from_frames(frames, (side, side), run.sample, "video", sig)]
        return out

    def _newline(self, like: torch.Tensor) -> torch.Tensor:
        return self.multimodal_module.image_newline.to(like.device, like.dtype)

    def _pack_grid(self, item: VisualItem, width: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A high-resolution item's surviving tokens in raster order with a newline after every row.
        -> features [K + rows, C], newline flags [K + rows]."""
        tokens, origin = item.frames[0], item.origin[0].to(item.frames[0].device)
        row = origin // width
        keys = torch.cat([origin + row, torch.arange(rows, device=tokens.device) * (width + 1) + width])
        order = torch.argsort(keys)
        features = torch.cat([tokens, self._newline(tokens).expand(rows, -1)])[order]
        flags = torch.cat([torch.zeros(tokens.shape[0], dtype=torch.bool), torch.ones(rows, dtype=torch.bool)])[order.cpu()]
        return features, flags

    def rebuild_inputs(self, kwargs: dict[str, Any], items: list[VisualItem]) -> tuple[dict[str, Any], ShrunkSequence | None]:
        runs = self._runs(kwargs)
        remaining = iter(items)
        image_features, video_features, flags, old_counts, new_counts = [], [], [], [], []
        for run in runs:
            first = next(remaining)
            if run.kind == "image":
                features, newline = first.frames[0], torch.zeros(first.frames[0].shape[0], dtype=torch.bool)
                if run.hires is not None:
                    grid, grid_flags = self._pack_grid(next(remaining), run.hires[1], run.hires[0])
                    features, newline = torch.cat([features, grid]), torch.cat([newline, grid_flags])
                else:
                    features = torch.cat([features, self._newline(features)[None]])
                    newline = torch.cat([newline, torch.ones(1, dtype=torch.bool)])
                image_features.append(features)
            else:
                features = torch.cat(first.frames)
                newline = torch.zeros(features.shape[0], dtype=torch.bool)
                if self.video_newline:
                    features = torch.cat([features, self._newline(features)[None]])
                    newline = torch.cat([newline, torch.ones(1, dtype=torch.bool)])
                video_features.append(features)
            flags.append(newline)
            old_counts.append(run.length)
            new_counts.append(features.shape[0])
        encoded = {}
        if image_features:
            encoded["image"] = BaseModelOutputWithPooling(pooler_output=image_features)
        if video_features:  # the forward flattens (videos, tokens): one row holding every video's tokens
            encoded["video"] = BaseModelOutputWithPooling(pooler_output=torch.cat(video_features)[None])
        kwargs, shrunk = self.feed_features(kwargs, encoded, self.visual_token_ids, old_counts, new_counts)
        self._rebuilt = (kwargs["input_ids"], self._scatter_flags(kwargs["input_ids"], flags))
        return kwargs, shrunk

    # --- token roles ---------------------------------------------------------------------------------
    def _scatter_flags(self, input_ids: torch.Tensor, flags: list[torch.Tensor]) -> torch.Tensor:
        """Newline flags of every run (row-major order) placed on the placeholder positions of input_ids."""
        placeholder = torch.isin(input_ids, torch.tensor(self.visual_token_ids, device=input_ids.device))
        protected = torch.zeros(input_ids.numel(), dtype=torch.bool, device=input_ids.device)
        flat = placeholder.reshape(-1).nonzero().squeeze(1)
        if flags:
            protected[flat] = torch.cat(flags).to(input_ids.device)
        return protected.view(input_ids.shape)

    def protected_placeholders(self, kwargs: dict[str, Any], items: list[VisualItem] | None) -> torch.Tensor | None:
        if items is not None and self._rebuilt is not None and self._rebuilt[0] is kwargs["input_ids"]:
            protected = self._rebuilt[1]
            self._rebuilt = None
            return protected
        if not self.has_visual_input(kwargs) and self.generate_inputs is None:
            return None
        runs = self._runs(kwargs)
        return self._scatter_flags(kwargs["input_ids"], [run.newline for run in runs]) if runs else None

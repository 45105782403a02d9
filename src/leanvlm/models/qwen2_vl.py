"""Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`):
a packed vision tower (no CLS, fused `qkv`, 2 x 2 patch merger), images and videos in one batch, M-RoPE.

Visual items. Each image / video is one `VisualItem` whose frames are its temporal patches (an image has
one, a video of F frames has F / temporal_patch_size); a frame holds the (h/2) x (w/2) LLM tokens of the
2 x 2-merged grid in raster order, so merging happens per temporal patch frame on the tokens that enter
the LLM. Features come from the model's `get_image_features` / `get_video_features`, or from the
`mm_encoder_outputs` that `generate` pre-encodes (then the grids it consumed are read from the caller's
generate inputs). Reduced features go back through `mm_encoder_outputs`.

Positions (design choice): surviving tokens keep their ORIGINAL 3-D M-RoPE ids. The model's own
position ids for the original input are taken as given (`generate` computes them before the prefill with
`get_rope_index`) or computed with the model's `compute_3d_position_ids`; after the shrink every kept
token gets the ids of the original token it stands for: text tokens their own, a surviving visual token
the ids of its patch (a merged token: its destination's, `VisualItem.origin`). The reduced grid is NOT
re-indexed. In the 4-row layout `generate` passes ([text, t, h, w]) the text row only drives the
attention mask / packed-sequence detection, so it is renumbered contiguously like 1-D positions.
Decoding continues from the original positions: `rope_deltas` (used by the model when it derives decode
positions itself, `position_ids=None` with a cache) is set to (max original position + 1) - (tokens in
the shrunk prompt), and cached decode steps with explicit ids (what `generate` passes) keep their
original M-RoPE rows; only the text row is shifted down by the removed placeholders.
In-LLM dropping needs nothing special: decoder layers receive (cos, sin) [B, N, d] already combined over
the M-RoPE sections and 2-D text position ids, which the runtime gathers per kept token.

Vision signals (for stages that need them) come from the LAST vision block, whose output the merger
reads; see `models.vision.packed_vision_signals` for the no-CLS substitute (mean-token query, no 2-D
rotary) and how Qwen2.5-VL's window permutation is undone.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from leanvlm.compat import without_cache_arguments
from leanvlm.models.base import ModelAdapter
from leanvlm.models.vision import VisionProbe, packed_vision_signals
from leanvlm.ops.select import gather_slots
from leanvlm.runtime.visual import ShrunkSequence, VisualItem, shrink_placeholders


@dataclass
class Run:
    """One image / video placeholder run: grid (t, h, w) in patches, columns = its placeholders' flat
    (row-major) positions in input_ids."""

    kind: str
    index: int
    grid: tuple[int, int, int]
    sample: int
    flat: torch.Tensor

    @property
    def length(self) -> int:
        return self.flat.numel()


class QwenVLAdapter(ModelAdapter):
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    family = "qwen2_vl"

    @property
    def _merge(self) -> int:
        return int(self.model.config.vision_config.spatial_merge_size)

    # --- gathering positions -------------------------------------------------------------------------
    def gather_position_embeddings(self, position_embeddings: Any, index: torch.Tensor) -> Any:
        """(cos, sin) [B, N, d] (transformers 5) or [3, B, N, d] per M-RoPE section (older layouts)."""
        out = []
        for t in position_embeddings:
            if t.dim() == 4:
                out.append(torch.stack([gather_slots(s, index, fill=None) for s in t]))
            else:
                out.append(gather_slots(t, index, fill=None))
        return tuple(out)

    # --- runs ----------------------------------------------------------------------------------------
    def _grids(self, kwargs: dict[str, Any], kind: str) -> list[tuple[int, int, int]]:
        grid = self.visual_input(kwargs, f"{kind}_grid_thw")
        mm = kwargs.get("mm_encoder_outputs") or {}
        present = self.visual_input(kwargs, "pixel_values" if kind == "image" else "pixel_values_videos") is not None
        if grid is None:
            if present or mm.get(kind) is not None:
                raise ValueError(f"{self.family}: {kind} inputs without `{kind}_grid_thw`; pass the processor's grids")
            return []
        return [tuple(int(v) for v in row) for row in torch.as_tensor(grid).tolist()]

    def _runs(self, kwargs: dict[str, Any]) -> list[Run]:
        input_ids = kwargs["input_ids"]
        runs = []
        for kind, token in zip(("image", "video"), self.visual_token_ids):
            flat = (input_ids == token).reshape(-1).nonzero().squeeze(1)
            grids = self._grids(kwargs, kind)
            counts = [t * h * w // self._merge**2 for t, h, w in grids]
            if sum(counts) != flat.numel():
                raise ValueError(f"{self.family}: input_ids hold {flat.numel()} {kind} placeholders but the {kind} "
                                 f"grids need {sum(counts)}")
            start = 0
            for index, (grid, count) in enumerate(zip(grids, counts)):
                cols = flat[start:start + count]
                runs.append(Run(kind, index, grid, int(cols[0]) // input_ids.shape[1] if count else 0, cols))
                start += count
        return sorted(runs, key=lambda run: int(run.flat[0]) if run.length else 0)

    # --- pre-LLM -------------------------------------------------------------------------------------
    def has_visual_input(self, kwargs: dict[str, Any]) -> bool:
        mm = kwargs.get("mm_encoder_outputs") or {}
        return any(kwargs.get(k) is not None for k in ("pixel_values", "pixel_values_videos")) or \
            mm.get("image") is not None or mm.get("video") is not None

    def install_vision_probe(self) -> VisionProbe:
        return VisionProbe(self.multimodal_module.visual.blocks[-1])

    def _window_order(self, grids: list[tuple[int, int, int]]) -> torch.Tensor | None:
        """Qwen2.5-VL permutes merge units into attention windows inside the tower: their order, or None."""
        visual = self.multimodal_module.visual
        if not hasattr(visual, "window_size"):
            return None
        from transformers.vision_utils import get_vision_window_index

        order, _ = get_vision_window_index(torch.tensor(grids), spatial_merge_size=visual.spatial_merge_size,
                                           window_size=visual.window_size, patch_size=visual.patch_size)
        return order

    def encode_visual(self, kwargs: dict[str, Any], needs: frozenset[str], probe: VisionProbe | None) -> list[VisualItem]:
        runs = self._runs(kwargs)
        mm = kwargs.get("mm_encoder_outputs") or {}
        kinds = [kind for kind in ("image", "video") if any(run.kind == kind for run in runs)]
        pre_encoded = all(mm.get(kind) is not None for kind in kinds)
        merge = self._merge
        by_kind: dict[tuple[str, int], VisualItem] = {}
        for position, kind in enumerate(kinds):
            of_kind = [run for run in runs if run.kind == kind]
            grids = [run.grid for run in sorted(of_kind, key=lambda r: r.index)]
            encoded = mm.get(kind)
            if encoded is None:
                if kind == "image":
                    encoded = self.multimodal_module.get_image_features(
                        kwargs["pixel_values"], torch.as_tensor(self.visual_input(kwargs, "image_grid_thw")), return_dict=True)
                else:
                    encoded = self.multimodal_module.get_video_features(
                        kwargs["pixel_values_videos"], torch.as_tensor(self.visual_input(kwargs, "video_grid_thw")),
                        return_dict=True)
            signals: dict[str, list[torch.Tensor]] = {}
            if needs:
                # generate encodes images then videos before the first forward: one capture per modality
                back = len(kinds) - 1 - position if pre_encoded else 0
                frame_patches = [h * w for t, h, w in grids for _ in range(t)]
                signals = packed_vision_signals(probe, needs, frame_patches, merge * merge, self._window_order(grids), back)
            frame = 0
            for run in sorted(of_kind, key=lambda r: r.index):
                t, h, w = run.grid
                grid = (h // merge, w // merge)
                features = encoded.pooler_output[run.index]
                item_signals = {name: torch.stack(values[frame:frame + t]) for name, values in signals.items()}
                frame += t
                item = VisualItem.from_frames(features.reshape(t, grid[0] * grid[1], -1), grid, run.sample, kind,
                                              item_signals)
                self._attach_encoder_extras(item, encoded, run.index)
                by_kind[(kind, run.index)] = item
        return [by_kind[(run.kind, run.index)] for run in runs]

    def _attach_encoder_extras(self, item: VisualItem, encoded: Any, index: int) -> None:
        """Keep what else the encoder output holds for this image / video (index among its kind) in item.info;
        nothing for Qwen2-VL / Qwen2.5-VL (Qwen3-VL: its DeepStack features)."""

    def _encoder_output(self, items: list[VisualItem]) -> BaseModelOutputWithPooling:
        """The `mm_encoder_outputs` entry of one modality that feeds these reduced items (in index order)."""
        return BaseModelOutputWithPooling(pooler_output=[torch.cat(item.frames) for item in items])

    def _original_positions(self, kwargs: dict[str, Any]) -> torch.Tensor:
        """The model's position ids for the unreduced input: [3, B, L] M-RoPE (or [4, B, L] with the text row
        first, as `generate` passes them)."""
        given = kwargs.get("position_ids")
        if given is not None:
            return given if given.dim() == 3 else given[None].expand(3, -1, -1)
        mm = self.multimodal_module
        # The whole prompt's ids: the cache parameter (named differently across versions) stays at its default.
        names = inspect.signature(mm.compute_3d_position_ids).parameters
        known = {name: self.visual_input(kwargs, name) for name in names}
        call = without_cache_arguments(mm.compute_3d_position_ids, known)
        call.update(input_ids=kwargs["input_ids"], attention_mask=kwargs.get("attention_mask"), inputs_embeds=None)
        positions = mm.compute_3d_position_ids(**call)
        if positions is None:  # the model could not build M-RoPE ids either: it would use 0..L-1
            length = kwargs["input_ids"].shape[1]
            positions = torch.arange(length, device=kwargs["input_ids"].device).view(1, 1, -1).expand(3, kwargs["input_ids"].shape[0], -1)
        return positions

    def rebuild_inputs(self, kwargs: dict[str, Any], items: list[VisualItem]) -> tuple[dict[str, Any], ShrunkSequence | None]:
        runs = self._runs(kwargs)
        features: dict[str, dict[int, VisualItem]] = {"image": {}, "video": {}}
        old_counts, new_counts = [], []
        input_ids = kwargs["input_ids"]
        # original flat column each kept placeholder takes its M-RoPE ids from (identity elsewhere)
        source = torch.arange(input_ids.numel(), device=input_ids.device)
        for run, item in zip(runs, items):
            features[run.kind][run.index] = item
            per_frame = item.grid[0] * item.grid[1]
            # frame by frame: each frame's survivors stay in that frame's own placeholders (Qwen3-VL puts a
            # timestamp text between the frames of a video; Qwen2-VL's contiguous runs are unaffected)
            for f, org in enumerate(item.origin):
                columns = run.flat[f * per_frame:(f + 1) * per_frame]
                source[columns[:org.numel()]] = columns[org.to(input_ids.device)]
                old_counts.append(per_frame)
                new_counts.append(org.numel())
        kwargs = dict(kwargs)
        kwargs["pixel_values"] = kwargs["pixel_values_videos"] = None
        # A new dict: generate reuses its own across uncached steps, which must see the unreduced features.
        encoded = dict(kwargs.get("mm_encoder_outputs") or {})
        for kind, by_index in features.items():
            if by_index:
                encoded[kind] = self._encoder_output([by_index[i] for i in sorted(by_index)])
        kwargs["mm_encoder_outputs"] = encoded
        if new_counts == old_counts:
            return kwargs, None
        positions = self._original_positions(kwargs)
        placeholder = torch.isin(input_ids, torch.tensor(self.visual_token_ids, device=input_ids.device))
        text_row = positions[0] if positions.shape[0] == 4 else None
        shrunk = shrink_placeholders(input_ids, kwargs.get("attention_mask"), text_row, placeholder,
                                     old_counts, new_counts, self.pad_token_id)
        batch, length = input_ids.shape
        kept = shrunk.kept
        rows = torch.arange(batch, device=kept.device)[:, None] * length
        src = torch.where(kept >= 0, source[(rows + kept.clamp(min=0)).reshape(-1)].view(kept.shape) - rows, -1)
        mrope = positions[-3:].expand(3, batch, length)
        new_positions = torch.stack([gather_slots(row, src, fill=0) for row in mrope])
        valid = shrunk.attention_mask.bool()
        if positions.shape[0] == 4:
            new_positions = torch.cat([shrunk.position_ids[None], new_positions])
        kwargs["input_ids"] = shrunk.input_ids
        kwargs["attention_mask"] = shrunk.attention_mask
        kwargs["position_ids"] = new_positions
        if kwargs.get("mm_token_type_ids") is not None:
            kwargs["mm_token_type_ids"] = gather_slots(kwargs["mm_token_type_ids"], kept, fill=0)
        # decode positions the model derives itself: cumulative count of the shrunk prompt + rope_deltas
        top = torch.where(valid[None], new_positions[-3:], -1).amax(dim=(0, 2))
        self.multimodal_module.rope_deltas = (top + 1 - valid.sum(dim=1))[:, None]
        return kwargs, shrunk

    def decode_inputs(self, kwargs: dict[str, Any], shrunk: ShrunkSequence, prompt_length: int) -> dict[str, Any]:
        """Cached step after a pre-LLM shrink: remap the attention mask; explicit M-RoPE ids already continue
        from the original positions (kept), a 4-row layout's text row shifts down like 1-D positions."""
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            kwargs["attention_mask"] = torch.cat([shrunk.attention_mask.to(mask.dtype), mask[:, prompt_length:]], dim=1)
        positions = kwargs.get("position_ids")
        if positions is not None and positions.dim() == 3 and positions.shape[0] == 4:
            text = positions[:1] - shrunk.removed.to(positions.device)[None, :, None]
            kwargs["position_ids"] = torch.cat([text, positions[1:]])
        return kwargs

"""Common base for families whose every image (or image tile) is one fixed square grid of LLM tokens.

Gemma 3 (SigLIP patches average-pooled to `mm_tokens_per_image`) and InternVL (InternViT patches
pixel-shuffled 2 x 2) both put T = s x s tokens per encoder pass into the LLM, one run of T image
placeholders per pass, passes in the order of `pixel_values`, no newline tokens; the model scatters the
features into the placeholders in row-major order (`masked_scatter`), so the k-th pass fills placeholders
k*T .. (k+1)*T - 1 of the flattened batch. Each pass is one `VisualItem` (grid s x s, one frame).

A subclass says how its features come out (`_image_features`, a [passes, T, C] tensor), which encoder
layer the projector reads (`_probe_layer`), whether the tower has a CLS token and how many leading
tokens the projector drops (`_signal_layout`), and how the projector folds patches into one LLM token
(`_fold`), which the vision signals are folded with too, so a token's signal covers its own patches.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from leanvlm.models.base import ModelAdapter
from leanvlm.models.vision import VisionProbe, encoder_layers, vision_signals
from leanvlm.runtime.visual import ShrunkSequence, VisualItem


class GridAdapter(ModelAdapter):
    """One s x s token grid per encoder pass; subclasses fill in the family's tower and projector."""

    run_offsets_supported = True  # each pass's placeholder run is its s x s grid, raster order

    # --- the family's specifics --------------------------------------------------------------------
    def _image_features(self, kwargs: dict[str, Any]) -> BaseModelOutputWithPooling:
        """The model's own `get_image_features` for kwargs["pixel_values"]: pooler_output [passes, T, C]."""
        raise NotImplementedError

    def _probe_layer(self, layers: nn.ModuleList) -> nn.Module:
        """The encoder layer whose output the projector reads."""
        raise NotImplementedError

    def _signal_layout(self, kwargs: dict[str, Any]) -> tuple[bool, int]:
        """(tower has a CLS token, leading tokens the projector drops before the patches)."""
        raise NotImplementedError

    def _fold(self, values: torch.Tensor) -> torch.Tensor:
        """[passes, P*P, c] per-patch values -> [passes, T, patches per token, c]: the patches that the
        projector folds into each LLM token, tokens in the LLM's order."""
        raise NotImplementedError

    # --- pre-LLM -------------------------------------------------------------------------------------
    def install_vision_probe(self) -> VisionProbe:
        return VisionProbe(self._probe_layer(encoder_layers(self.multimodal_module.vision_tower)))

    def has_visual_input(self, kwargs: dict[str, Any]) -> bool:
        return kwargs.get("pixel_values") is not None or (kwargs.get("mm_encoder_outputs") or {}).get("image") is not None

    def _signals(self, probe: VisionProbe, needs: frozenset[str], kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """name -> [passes, T] ("keys": [passes, T, D]) per LLM token: attention summed over the token's
        patches (its share of the query's attention), similarity and keys averaged."""
        has_cls, prefix = self._signal_layout(kwargs)
        signals = {}
        for name, value in vision_signals(probe, needs, has_cls, prefix).items():
            folded = self._fold(value if value.dim() == 3 else value[..., None])  # [passes, T, k, c]
            folded = folded.sum(dim=2) if name == "cls_attention" else folded.mean(dim=2)
            signals[name] = folded if name == "keys" else folded[..., 0]
        return signals

    def encode_visual(self, kwargs: dict[str, Any], needs: frozenset[str], probe: VisionProbe | None) -> list[VisualItem]:
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is None:  # a plain forward; `generate` encodes the images itself beforehand
            encoded = self._image_features(kwargs)
        features = encoded.pooler_output  # [passes, T, C]
        if not torch.is_tensor(features):
            features = torch.stack(list(features))
        passes, tokens = features.shape[:2]
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"{self.family}: {tokens} tokens per image are not a square grid")
        input_ids = kwargs["input_ids"]
        flat = (input_ids == self.visual_token_ids[0]).reshape(-1).nonzero().squeeze(1)
        if flat.numel() != passes * tokens:
            raise ValueError(f"{self.family}: input_ids hold {flat.numel()} image placeholders but the "
                             f"{passes} images need {passes * tokens}")
        signals = self._signals(probe, needs, kwargs) if needs else {}
        has_cls = self._signal_layout(kwargs)[0]
        items = []
        for index in range(passes):
            sample = int(flat[index * tokens]) // input_ids.shape[1]
            item = VisualItem.from_frames(features[index:index + 1], (side, side), sample, "image",
                                          {name: value[index:index + 1] for name, value in signals.items()})
            if needs and not has_cls:
                item.info["cls_substitute"] = "no CLS token: the mean of all tokens is the query"
            items.append(item)
        return items

    def rebuild_inputs(self, kwargs: dict[str, Any], items: list[VisualItem]) -> tuple[dict[str, Any], ShrunkSequence | None]:
        # The model scatters a [1, total, C] tensor as well as [passes, T, C]: one row of every kept token.
        features = torch.cat([torch.cat(item.frames) for item in items])[None]
        old_counts = [item.grid[0] * item.grid[1] for item in items]
        new_counts = [item.num_tokens for item in items]
        return self.feed_features(kwargs, {"image": BaseModelOutputWithPooling(pooler_output=features)},
                                  self.visual_token_ids[:1], old_counts, new_counts,
                                  [item.run_offsets() for item in items])

"""LLaVA-1.5 architecture (`LlavaForConditionalGeneration`): one square patch grid per image, no CLS or
newline tokens in the LLM sequence, 1-D RoPE text models (Llama, Qwen2, ...)."""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from leanvlm.models.base import ModelAdapter
from leanvlm.models.vision import VisionProbe, encoder_layers, feature_layer_index, vision_signals
from leanvlm.runtime.visual import ShrunkSequence, VisualItem


class LlavaAdapter(ModelAdapter):
    model_classes = ("LlavaForConditionalGeneration",)
    family = "llava"
    run_offsets_supported = True  # one placeholder per patch of the image's grid, raster order

    def _feature_layer(self) -> int:
        layer = self.model.config.vision_feature_layer
        return layer if isinstance(layer, int) else layer[-1]

    def install_vision_probe(self) -> VisionProbe:
        # Signals come from the encoder layer whose output the projector reads (LLaVA: the penultimate).
        layers = encoder_layers(self.multimodal_module.vision_tower)
        return VisionProbe(layers[feature_layer_index(self._feature_layer(), len(layers))])

    def has_visual_input(self, kwargs: dict[str, Any]) -> bool:
        return kwargs.get("pixel_values") is not None or (kwargs.get("mm_encoder_outputs") or {}).get("image") is not None

    def encode_visual(self, kwargs: dict[str, Any], needs: frozenset[str], probe: VisionProbe | None) -> list[VisualItem]:
        input_ids = kwargs["input_ids"]
        config = self.model.config
        strategy = kwargs.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is None:  # a plain forward; `generate` encodes the images itself beforehand
            encoded = self.multimodal_module.get_image_features(
                pixel_values=kwargs["pixel_values"],
                vision_feature_layer=kwargs.get("vision_feature_layer"),
                vision_feature_select_strategy=strategy,
                image_sizes=kwargs.get("image_sizes"),
                return_dict=True,
            )
        features = encoded.pooler_output  # list of [T, C], one per image
        signals = {}
        has_cls = "siglip" not in type(self.multimodal_module.vision_tower).__name__.lower()
        if needs:
            signals = vision_signals(probe, needs, has_cls, prefix=1 if strategy == "default" else 0)
        # Which batch row each image belongs to: images fill the placeholder runs in row-major order.
        placeholder = input_ids == self.visual_token_ids[0]
        row_of_token = placeholder.nonzero()[:, 0]
        items, start = [], 0
        for index, image in enumerate(features):
            side = math.isqrt(image.shape[0])
            grid = (side, side) if side * side == image.shape[0] else (1, image.shape[0])
            sample = int(row_of_token[start]) if start < row_of_token.numel() else 0
            item_signals = {name: value[index : index + 1] for name, value in signals.items()}
            item = VisualItem.from_frames(image[None], grid, sample, signals=item_signals)
            if needs and not has_cls:
                item.info["cls_substitute"] = "no CLS token: the mean of all tokens is the query"
            items.append(item)
            start += image.shape[0]
        return items

    def rebuild_inputs(self, kwargs: dict[str, Any], items: list[VisualItem]) -> tuple[dict[str, Any], ShrunkSequence | None]:
        features = [torch.cat(item.frames, dim=0) for item in items]
        old_counts = [item.grid[0] * item.grid[1] * len(item.frames) for item in items]
        new_counts = [f.shape[0] for f in features]
        return self.feed_features(kwargs, {"image": BaseModelOutputWithPooling(pooler_output=features)},
                                  self.visual_token_ids[:1], old_counts, new_counts,
                                  [item.run_offsets() for item in items])

"""InternVL 2.5 / 3 (`InternVLForConditionalGeneration`): InternViT tiles, pixel shuffle, 1-D RoPE Qwen2 /
Llama text model, images only (the processor feeds video frames as images: they are tiles here too).

Quirks:
- Tiles: the processor cuts an image into up to `max_patches` 448 px tiles plus a thumbnail; every tile
  is one row of `pixel_values` and one run of `image_seq_length` (256) `<IMG_CONTEXT>` placeholders
  between `<img>` and `</img>` text tokens. The model itself never learns which tiles form one image, so
  each tile is one `VisualItem` (an s x s grid): stages reduce every tile at the method's rate.
- Pixel shuffle (`downsample_ratio` 0.5): the 32 x 32 patch grid of a tile becomes 16 x 16 LLM tokens, each
  the channel concatenation of a 2 x 2 block of patches, in raster order of the 16 x 16 grid.
- InternViT has a CLS token, which the "default" strategy drops before the pixel shuffle (the only
  strategy the shuffle's square reshape allows).
- No newline or other separator is a placeholder: `<img>` / `</img>` are text tokens, never reduced.

Vision signals: from the encoder layer `vision_feature_layer` selects (the last one by default), the CLS
query's attention to the patch keys (after the tower's q/k norms when it has them) and the CLS-patch
similarity; each LLM token gets the attention summed and the similarity / keys averaged over its 2 x 2
block, folded with the model's own `pixel_shuffle` so the grouping follows the model.
Reduced features go back through `mm_encoder_outputs`; 1-D positions are renumbered after the shrink.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from leanvlm.models.grid import GridAdapter
from leanvlm.models.vision import feature_layer_index


class InternVLAdapter(GridAdapter):
    model_classes = ("InternVLForConditionalGeneration",)
    family = "internvl"

    def _strategy(self, kwargs: dict[str, Any]) -> str:
        return self.visual_input(kwargs, "vision_feature_select_strategy") or self.model.config.vision_feature_select_strategy


    def _image_features(self, kwargs: dict[str, Any]) -> BaseModelOutputWithPooling:
        return self.multimodal_module.get_image_features(
            pixel_values=kwargs["pixel_values"], vision_feature_layer=kwargs.get("vision_feature_layer"),
            vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"), return_dict=True)

    def _probe_layer(self, layers: nn.ModuleList) -> nn.Module:
        layer = self.model.config.vision_feature_layer  # the probe is installed once: the config's layer
        return layers[feature_layer_index(layer if isinstance(layer, int) else layer[-1], len(layers))]

    def _signal_layout(self, kwargs: dict[str, Any]) -> tuple[bool, int]:
        return True, 1 if self._strategy(kwargs) == "default" else 0

    def _fold(self, values: torch.Tensor) -> torch.Tensor:
        passes, patches, channels = values.shape
        side = round(patches ** 0.5)
        ratio = self.model.config.downsample_ratio
        shuffled = self.multimodal_module.pixel_shuffle(values.reshape(passes, side, side, channels), scale_factor=ratio)
        # [passes, s, s, k * c]: each token's k patches, c channels each, concatenated
        return shuffled.reshape(passes, -1, round(1 / ratio) ** 2, channels)

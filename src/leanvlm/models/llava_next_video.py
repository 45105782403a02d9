"""LLaVA-NeXT-Video (`LlavaNextVideoForConditionalGeneration`, the LLaVA-Video style): CLIP tiles packed
LLaVA-NeXT style (base tile, then the unpadded high-resolution grid with a newline after every row), and
videos whose frames the model pools itself (`vision_resampler`, average/max pooling with stride 2 by
default) with NO newline token; 1-D RoPE Llama text model. Images and videos may share a batch.

The layout handling is the LLaVA-OneVision adapter's (see `models.onevision`): the packed features are
reduced per base tile / high-resolution grid / video frame, newline tokens are protected and rebuilt after
the last survivor of each grid row. Differences handled here: every image is tiled (no `batch_num_images`,
no interpolation), the packing helper takes the feature-select strategy, a video has no newline, and
video signals are pooled with the model's resampler (average pooling instead when the resampler is a
convolution, which cannot be applied to a score).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next_video.modeling_llava_next_video import image_size_to_num_patches

from leanvlm.models.onevision import OneVisionAdapter


class LlavaNextVideoAdapter(OneVisionAdapter):
    model_classes = ("LlavaNextVideoForConditionalGeneration",)
    family = "llava_next_video"
    video_newline = False

    @property
    def _video_side(self) -> int:
        return self._side // self.model.config.spatial_pool_stride

    def _tiles_per_image(self, kwargs: dict[str, Any], sizes: torch.Tensor) -> list[int]:
        config = self.model.config
        return [image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
                for size in sizes]

    def _pack(self, features: list[torch.Tensor], sizes: torch.Tensor, kwargs: dict[str, Any],
              newline: torch.Tensor | None) -> list[torch.Tensor]:
        packed, _ = self.multimodal_module.pack_image_features(features, sizes, self._strategy(kwargs),
                                                               image_newline=newline)
        return packed

    def _pool_video_signal(self, values: torch.Tensor) -> torch.Tensor:
        resampler = self.multimodal_module.vision_resampler
        if isinstance(resampler.pool, (nn.AvgPool2d, nn.MaxPool2d)):
            return resampler(values)
        side, stride = self._side, self.model.config.spatial_pool_stride
        grid = values.transpose(1, 2).reshape(values.shape[0], values.shape[2], side, side)
        return nn.functional.avg_pool2d(grid, stride, stride).flatten(2).transpose(1, 2)

    def _image_features(self, kwargs: dict[str, Any]) -> BaseModelOutputWithPooling:
        return self.multimodal_module.get_image_features(
            pixel_values=kwargs["pixel_values"], image_sizes=kwargs.get("image_sizes"),
            vision_feature_layer=kwargs.get("vision_feature_layer"),
            vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"), return_dict=True)

"""LLaVA-NeXT / LLaVA-1.6 (`LlavaNextForConditionalGeneration`): CLIP anyres tiles packed with image-newline
tokens, images only (no video), 1-D RoPE text model (Vicuna / Mistral / Llama-3 / Qwen).

The sequence of one image (transformers' `pack_image_features`): the base tile's h x w tokens (the whole
image resized to one tile), then the high-resolution grid (the tiles of the best-fitting
`image_grid_pinpoints` resolution stitched and unpadded to the image's aspect ratio) row by row, each row
followed by the learned `image_newline` token. Every position, newlines included, is an image placeholder
in input_ids; the placeholder count of an image depends on its `image_sizes` entry.

This is exactly the image path of LLaVA-NeXT-Video (same packing helper, same tiling, "default" strategy
drops CLIP's CLS before the projector), so the adapter is `LlavaNextVideoAdapter` configured for a family
without videos (the config has no video token, so no video run is ever looked for): a tiled image is two
`VisualItem`s (base tile, high-resolution grid), newline tokens are protected (never reduced, not counted
as visual by in-LLM stages) and rebuilt after the last survivor of each grid row (see `models.onevision`).
Vision signals: CLIP has a CLS token, taken from the `vision_feature_layer` encoder layer (the last of a
list of layers when several are concatenated) and packed like the features.
"""

from __future__ import annotations

from leanvlm.models.llava_next_video import LlavaNextVideoAdapter


class LlavaNextAdapter(LlavaNextVideoAdapter):
    model_classes = ("LlavaNextForConditionalGeneration",)
    family = "llava_next"

    @property
    def _video_side(self) -> int:
        return 0  # no video pooling (no `spatial_pool_stride`): a LLaVA-NeXT prompt never has video runs

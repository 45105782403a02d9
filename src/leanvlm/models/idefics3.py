"""Idefics3 and SmolVLM (`Idefics3ForConditionalGeneration`, `SmolVLMForConditionalGeneration`: the same
layout, SmolVLM is Idefics3's code with a smaller tower/LLM): a SigLIP-style tower without CLS, a pixel
shuffle connector, image splitting into tiles, 1-D RoPE Llama text model.

How the LLM sequence is laid out (the processors' prompt, the model's `inputs_merger`):
- `pixel_values` is [B, max tiles, 3, H, W]: every image of a sample is split into rows x cols tiles plus
  one downscaled global tile (no splitting: the global tile only); all-zero tiles are batch padding that
  the model drops. Each tile is encoded on its own;
- the connector's pixel shuffle folds every s x s block of patches (s = `scale_factor`) into one token,
  so a tile gives `image_seq_len` = (side / patch / s)^2 LLM tokens in a (side/patch/s)^2 raster;
- in input_ids each tile is one run of `image_seq_len` image placeholders, preceded by text tokens the
  processor writes: `<fake_token_around_image>` and `<row_i_col_j>` (or `<global-img>` before the global
  tile), with a newline text token after each tile row and a closing `<fake_token_around_image>`.
  SmolVLM's videos are frames written as such tiles with timestamp text: the model sees images only.

Design: every TILE is one `VisualItem` (one frame, grid = the token raster after the pixel shuffle, the
tiles of a sample in their order in input_ids), so each tile is reduced on its own and its survivors fill
its own placeholder run (the shrink is per tile). The row/column, global-image and fake tokens are text:
no pre-LLM stage touches them and in-LLM stages never count or drop them as visual tokens (the one method
option that prunes text, `ITP(prune_text=True)`, treats them as it treats any other text before the
question). 1-D positions are renumbered contiguously after a pre-LLM shrink, as for LLaVA-1.5.

Vision signals come from the LAST encoder layer (the connector reads its output after the post-layernorm).
No CLS: the mean token of the tile is the substitute query / reference (`models.vision`). Per-patch
values are folded into per-token ones with the model's own `pixel_shuffle`: a token's attention is the sum
over its s x s patches, its similarity and keys the mean. Padding patches of a partly padded tile
(`pixel_attention_mask`) are scored like the others.
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


class Idefics3Adapter(ModelAdapter):
    model_classes = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
    family = "idefics3"
    run_offsets_supported = True  # each tile's placeholder run is its grid (row / column tokens are text)

    @property
    def text_model(self) -> nn.Module:
        return self.model.model.text_model

    @property
    def visual_token_ids(self) -> list[int]:
        return [int(self.model.config.image_token_id)]

    @property
    def _scale(self) -> int:
        return int(self.model.config.scale_factor)

    def has_visual_input(self, kwargs: dict[str, Any]) -> bool:
        return kwargs.get("pixel_values") is not None or (kwargs.get("mm_encoder_outputs") or {}).get("image") is not None

    def install_vision_probe(self) -> VisionProbe:
        return VisionProbe(encoder_layers(self.multimodal_module.vision_model)[-1])

    def _token_signals(self, probe: VisionProbe, needs: frozenset[str]) -> dict[str, torch.Tensor]:
        """Per-patch signals of every real tile -> per LLM token: name -> [tiles, T] ("keys": [tiles, T, D])."""
        signals = vision_signals(probe, needs, has_cls=False, prefix=0)
        shuffle, s2 = self.multimodal_module.connector.pixel_shuffle, self._scale ** 2
        out = {}
        for name, value in signals.items():
            channels = value[..., None] if value.dim() == 2 else value  # [tiles, P, c]
            # pixel_shuffle -> [tiles, P / s^2, s^2 * c], the s x s patches of a token one after the other
            folded = shuffle(channels, self._scale).unflatten(-1, (s2, channels.shape[-1]))
            reduced = folded.sum(dim=2) if name == "cls_attention" else folded.mean(dim=2)
            out[name] = reduced if name == "keys" else reduced[..., 0]
        return out

    def encode_visual(self, kwargs: dict[str, Any], needs: frozenset[str], probe: VisionProbe | None) -> list[VisualItem]:
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is None:  # a plain forward; `generate` encodes the images itself beforehand
            encoded = self.multimodal_module.get_image_features(
                kwargs["pixel_values"], kwargs.get("pixel_attention_mask"), return_dict=True)
        pooled = encoded.pooler_output  # one [tiles_b * T, C] per batch row, or (transformers < 5.2x) [tiles, T, C]
        features = torch.cat([f.reshape(-1, f.shape[-1]) for f in pooled]) if isinstance(pooled, (list, tuple)) \
            else pooled.reshape(-1, pooled.shape[-1])
        tokens = int(self.multimodal_module.image_seq_len)
        side = math.isqrt(tokens)
        # the batch row of every placeholder; tiles fill the placeholder runs in row-major order
        row_of_token = (kwargs["input_ids"] == self.visual_token_ids[0]).nonzero()[:, 0]
        if features.shape[0] != row_of_token.numel():
            raise ValueError(f"{self.family}: input_ids hold {row_of_token.numel()} image placeholders but the images "
                             f"give {features.shape[0]} tokens")
        signals = self._token_signals(probe, needs) if needs else {}
        items = []
        for tile, frame in enumerate(features.view(-1, tokens, features.shape[-1])):
            item_signals = {name: value[tile:tile + 1] for name, value in signals.items()}
            item = VisualItem.from_frames(frame[None], (side, side), int(row_of_token[tile * tokens]), "image",
                                          item_signals)
            if needs:
                item.info["cls_substitute"] = "no CLS token: the mean of the tile's patches is the query"
            items.append(item)
        return items

    def rebuild_inputs(self, kwargs: dict[str, Any], items: list[VisualItem]) -> tuple[dict[str, Any], ShrunkSequence | None]:
        # [tokens, 1, C] in placeholder order: one "block" per placeholder, which every transformers version's
        # merger takes (SmolVLM's block-wise merger of transformers 5.20 needs [blocks, tokens a block, C] with
        # equal blocks, which reduced tiles are not; masked_scatter only counts elements)
        features = torch.cat([item.frames[0] for item in items])[:, None]
        old_counts = [item.grid[0] * item.grid[1] for item in items]
        new_counts = [item.num_tokens for item in items]
        return self.feed_features(kwargs, {"image": BaseModelOutputWithPooling(pooler_output=features)},
                                  self.visual_token_ids[:1], old_counts, new_counts,
                                  [item.run_offsets() for item in items])

"""Gemma 3 (`Gemma3ForConditionalGeneration`): SigLIP 896 px images average-pooled to 256 tokens, a
Gemma 3 text model with interleaved sliding-window / global layers, images only.

Quirks:
- Projector pooling: the 64 x 64 SigLIP patch grid is average-pooled (`multi_modal_projector.avg_pool`,
  kernel 4) to the 16 x 16 grid of `mm_tokens_per_image` tokens, then normed and projected. Pan-and-scan
  crops are separate rows of `pixel_values`, each its own 256-token run: every crop is one `VisualItem`.
- Placeholders: `<start_of_image>` 256 x `<image_soft_token>` `<end_of_image>`; only the soft tokens are
  image placeholders (the start / end tokens are text and never reduced).
- Bidirectional image attention: the model lets every token of one image attend to every other token of
  that image (`token_type_ids` == 1 marks them; each contiguous run is one block). After a pre-LLM shrink
  `token_type_ids` is gathered with the kept tokens, so the surviving tokens of an image are still one
  contiguous block that attends to itself bidirectionally. In-LLM drops gather the model's own per-layer
  masks (one for the sliding, one for the global layers), so kept image tokens keep their bidirectional
  links and their sliding-window distances in the original positions. Cached decode steps carry no
  `token_type_ids` (the model's own rule: new tokens are causal); after an in-LLM drop the runtime masks
  them from positions, because a sliding layer's cache keeps only its last W - 1 (kept) tokens and the
  model sizes each mask by the first layer of its type, which may hold every token (see runtime.masks).
- Per-head q/k RMS norms before RoPE and `query_pre_attn_scalar` scaling: handled by the base `query_key`.
- Only a dynamic KV cache works: a compileable cache ("static", "hybrid") makes `generate` build the
  masks of the unreduced prompt before the forward; the runtime refuses it with a one-line error.

Vision signals: SigLIP has no CLS token, so the mean token of the last encoder layer (whose output the
projector pools) is the query / reference (`cls_substitute` in the stats); each LLM token's attention is
the sum, its similarity and keys the mean, over the 4 x 4 patches the projector's own average pool
folds into it. 1-D positions are renumbered after the shrink (as for LLaVA).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from leanvlm.models.grid import GridAdapter
from leanvlm.ops.select import gather_slots
from leanvlm.runtime.visual import ShrunkSequence, VisualItem


class Gemma3Adapter(GridAdapter):
    model_classes = ("Gemma3ForConditionalGeneration",)
    family = "gemma3"

    def _image_features(self, kwargs: dict[str, Any]) -> BaseModelOutputWithPooling:
        return self.multimodal_module.get_image_features(kwargs["pixel_values"], return_dict=True)

    def _probe_layer(self, layers: nn.ModuleList) -> nn.Module:
        return layers[-1]  # get_image_features reads the tower's last hidden state

    def _signal_layout(self, kwargs: dict[str, Any]) -> tuple[bool, int]:
        return False, 0

    def _fold(self, values: torch.Tensor) -> torch.Tensor:
        projector = self.multimodal_module.multi_modal_projector
        side, kernel = projector.patches_per_image, projector.kernel_size
        passes, _, channels = values.shape
        grid = values.reshape(passes, side // kernel, kernel, side // kernel, kernel, channels)
        # [passes, rows, cols, kernel x kernel, c]: the patches of one pooling window per token, raster order
        return grid.permute(0, 1, 3, 2, 4, 5).reshape(passes, (side // kernel) ** 2, kernel * kernel, channels)

    def rebuild_inputs(self, kwargs: dict[str, Any], items: list[VisualItem]) -> tuple[dict[str, Any], ShrunkSequence | None]:
        kwargs, shrunk = super().rebuild_inputs(kwargs, items)
        types = kwargs.get("token_type_ids")
        if shrunk is not None and types is not None:  # the bidirectional blocks follow the kept image tokens
            kwargs["token_type_ids"] = gather_slots(types, shrunk.kept, fill=0)
        return kwargs, shrunk

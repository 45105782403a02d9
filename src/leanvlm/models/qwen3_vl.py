"""Qwen3-VL and Qwen3-VL-MoE (`Qwen3VLForConditionalGeneration`, `Qwen3VLMoeForConditionalGeneration`: the
same multimodal code path, the MoE sibling only swaps the decoder MLPs): the Qwen2-VL layout (packed vision
tower without CLS, 2 x 2 patch merger, M-RoPE, images and videos in one batch) plus three quirks.

Interleaved M-RoPE. The text model interleaves the t/h/w frequencies inside each head instead of Qwen2-VL's
contiguous sections; it still hands every decoder layer one (cos, sin) [B, N, d] combined from 3-row
position ids, so surviving tokens keep their original 3-D ids exactly as in `models.qwen2_vl` (the position
handling, `rope_deltas` and decode steps are inherited unchanged).

Video timestamps. The processor writes every temporal frame of a video as its own placeholder run after a
timestamp text (`<t seconds> <vision_start> frame <vision_end>`), and `get_rope_index` gives each frame a
t = 1 grid. A video is still ONE `VisualItem` with one frame per temporal patch; after reduction each
frame's survivors fill that frame's own placeholders (the shrink is per frame, see
`QwenVLAdapter.rebuild_inputs`), so a frame's tokens stay after their timestamp. Timestamps are text: never
reduced, and not "question" tokens (those are the text after the last visual token).

DeepStack. The vision tower also returns, for each of `deepstack_visual_indexes` (3 levels for the 8B),
one feature [T, C] per LLM visual token, which the text model ADDS to the hidden states of the visual
tokens after decoder layers 0, 1, ... (level l after layer l). Both reductions keep them consistent:
- pre-LLM: the reduced item's DeepStack features are rebuilt from `VisualItem.groups`: a kept token takes
  its own features, a merged token the plain mean of the features of the original patches that ended in it
  (design choice: the exact merge weight of the main features is not recorded; the plain mean equals it
  for AIM's size-weighted merging and Pool's averaging, and approximates attention-weighted merges such as
  PruMerge's). They go back through `mm_encoder_outputs` with the pooled features;
- in-LLM: the adapter takes the injection over (`install_hooks`): a pre-hook on the text model removes
  `deepstack_visual_embeds` from its kwargs and a forward hook on each DeepStack layer adds level l to the
  visual tokens still present after that layer's drop (the runtime's index), exactly as the model's own
  `_deepstack_process` does. A drop at a layer before the last DeepStack layer therefore drops those
  tokens' later DeepStack features too. With nothing dropped the result is bit-identical to the model's.

Vision signals: the Qwen2-VL substitute (no CLS; mean-token query on the LAST vision block, which the main
merger reads; no window permutation in Qwen3-VL), see `models.vision.packed_vision_signals`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

from leanvlm.models.qwen2_vl import QwenVLAdapter
from leanvlm.ops.select import gather_slots
from leanvlm.runtime.visual import VisualItem


def merge_by_groups(features: torch.Tensor, groups: torch.Tensor, count: int) -> torch.Tensor:
    """Per-token features of one frame after a reduction: features [h*w, C] of the original patches, groups
    [h*w] the output token each patch ended in (-1 dropped) -> [count, C], each output the plain mean of its
    patches (a kept token: its own features, exactly)."""
    valid = groups >= 0
    target = groups[valid]
    summed = torch.zeros(count, features.shape[-1], dtype=features.dtype, device=features.device)
    summed.index_add_(0, target, features[valid])
    members = torch.bincount(target, minlength=count).clamp(min=1).to(features.dtype)
    return summed / members[:, None]


class Qwen3VLAdapter(QwenVLAdapter):
    model_classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
    family = "qwen3_vl"

    # --- pre-LLM: DeepStack features follow the reduced tokens ------------------------------------------
    def _attach_encoder_extras(self, item: VisualItem, encoded: Any, index: int) -> None:
        # deepstack_features: per level, a tuple over the images (or videos) of [t*h'*w', C]
        item.info["deepstack"] = [level[index] for level in getattr(encoded, "deepstack_features", None) or []]

    def _encoder_output(self, items: list[VisualItem]) -> BaseModelOutputWithDeepstackFeatures:
        levels = len(items[0].info.get("deepstack", [])) if items else 0
        deepstack = [[] for _ in range(levels)]
        for item in items:
            per_frame = item.grid[0] * item.grid[1]
            for level, features in enumerate(item.info["deepstack"]):
                frames = [merge_by_groups(features[f * per_frame:(f + 1) * per_frame], groups, frame.shape[0])
                          for f, (groups, frame) in enumerate(zip(item.groups, item.frames))]
                deepstack[level].append(torch.cat(frames))
        return BaseModelOutputWithDeepstackFeatures(pooler_output=[torch.cat(item.frames) for item in items],
                                                    deepstack_features=[tuple(level) for level in deepstack])

    # --- in-LLM: the DeepStack injection, with the runtime's drops applied ------------------------------
    def install_hooks(self, token_index: Callable[[], torch.Tensor | None]) -> list[RemovableHandle]:
        text = self.text_model
        levels = min(len(self.multimodal_module.visual.deepstack_visual_indexes), self.num_layers)
        state: dict[str, Any] = {}  # the text forward in progress' visual_pos_masks [B, N0] and embeds [V, C] per level

        def take_over(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
            state.clear()
            embeds = kwargs.get("deepstack_visual_embeds")
            if embeds is None:
                return None
            state.update(mask=kwargs["visual_pos_masks"], embeds=embeds)
            return args, {**kwargs, "deepstack_visual_embeds": None}

        def inject(level: int):
            def hook(module: nn.Module, args: tuple, output: Any) -> Any:
                if not state or level >= len(state["embeds"]):
                    return None
                hidden = output[0] if isinstance(output, tuple) else output
                mask, embeds = state["mask"].to(hidden.device), state["embeds"][level]
                index = token_index()
                if index is not None:  # tokens were dropped: the rows of the visual tokens still present
                    rank = (torch.cumsum(mask.reshape(-1).long(), 0) - 1).view(mask.shape)  # [B, N0]
                    kept_rank = gather_slots(rank, index, fill=0)
                    mask = gather_slots(mask, index, fill=False)  # [B, N]
                    embeds = embeds[kept_rank[mask].to(embeds.device)]
                # as the model's `_deepstack_process`
                hidden = hidden.clone()
                hidden[mask, :] = hidden[mask, :] + embeds.to(hidden.device, hidden.dtype)
                return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

            return hook

        handles = [text.register_forward_pre_hook(take_over, with_kwargs=True),
                   text.register_forward_hook(lambda module, args, output: state.clear(), always_call=True)]
        handles += [self.layers[level].register_forward_hook(inject(level)) for level in range(levels)]
        return handles

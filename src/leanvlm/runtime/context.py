"""What an in-LLM stage sees at its layer: the current tokens, their roles, and lazy q/k."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from leanvlm.ops.attention import received_attention
from leanvlm.ops.select import gather_slots


@dataclass
class TokenLayout:
    """Roles of the tokens of the LLM input sequence of one forward (layer-0 order). All [B, N0] bool.

    visual: image/video placeholder tokens; valid: attention-mask 1 (not padding); question: the
    instruction, i.e. the valid text tokens after the sample's last visual token (all valid text tokens
    when the sample has none after it). video [B] bool: the samples whose prompt holds a video placeholder.
    """

    visual: torch.Tensor
    valid: torch.Tensor
    question: torch.Tensor
    video: torch.Tensor

    @classmethod
    def from_ids(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, visual_ids: list[int],
                 protected: torch.Tensor | None = None, video_ids: list[int] | None = None) -> TokenLayout:
        """input_ids [B, N0] long, attention_mask [B, N0] (or None: all valid).

        protected [B, N0] bool (or None): placeholder positions that carry a separator the model inserts
        itself (LLaVA-OneVision's image newline). They are neither visual (never reduced) nor question tokens.
        video_ids: the model's video placeholder ids (None or []: an image-only model).
        """
        placeholder = torch.isin(input_ids, torch.tensor(visual_ids, device=input_ids.device))
        valid = torch.ones_like(placeholder) if attention_mask is None else attention_mask.bool()
        placeholder &= valid
        visual = placeholder if protected is None else placeholder & ~protected
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        last_visual = torch.where(placeholder, positions, -1).amax(dim=1, keepdim=True)  # [B, 1]
        text = valid & ~placeholder
        after = text & (positions > last_visual)
        question = torch.where(after.any(dim=1, keepdim=True), after, text)
        # torch.isin with an empty id list marks nothing: an image-only model has no video sample
        video = (torch.isin(input_ids, torch.tensor(video_ids or [], dtype=input_ids.dtype, device=input_ids.device))
                 & valid).any(dim=1)
        return cls(visual=visual, valid=valid, question=question, video=video)


QueryKeyFn = Callable[[torch.Tensor | None], tuple[torch.Tensor, torch.Tensor, float]]


@dataclass
class LayerContext:
    """The state at decoder layer `layer` right after it ran, for a stage to score.

    index [B, N]: each current slot's position in this forward's layer-0 sequence (-1 = filler slot that
    only keeps the batch rectangular). Positions are in causal order, so they double as the masking
    positions of `ops.attention`. key_bias [B, N0] float32 or None: the log(size) the model adds to its
    attention logits of each layer-0 slot (proportional attention of merged tokens), so that recomputed
    attention is the attention the model paid.
    """

    layer: int
    num_layers: int
    hidden: torch.Tensor  # [B, N, D], output of the layer
    index: torch.Tensor  # [B, N] long
    layout: TokenLayout
    visual_into_llm: torch.Tensor  # [B] long: visual tokens at layer 0
    query_key: QueryKeyFn = field(repr=False)
    key_bias: torch.Tensor | None = None

    def _role(self, mask: torch.Tensor) -> torch.Tensor:
        return gather_slots(mask, self.index, fill=False)

    @property
    def present(self) -> torch.Tensor:
        """[B, N] bool: real (valid, non-filler) tokens."""
        return self._role(self.layout.valid)

    @property
    def visual(self) -> torch.Tensor:
        """[B, N] bool: visual tokens still in the sequence."""
        return self._role(self.layout.visual)

    @property
    def question(self) -> torch.Tensor:
        """[B, N] bool: instruction tokens (see TokenLayout)."""
        return self._role(self.layout.question)

    @property
    def last_slot(self) -> torch.Tensor:
        """[B, 1] long: the slot of each row's last real token (the last slot under left padding)."""
        slots = torch.arange(self.index.shape[1], device=self.index.device)
        return torch.where(self.present, slots, -1).amax(dim=1, keepdim=True).clamp(min=0)

    def queries_keys(self, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """This layer's post-RoPE queries for slot index `rows` [B, R] (None: all) and keys of all slots.

        -> queries [B, H, R, d], keys [B, Hkv, N, d], softmax scale. Recomputed from the layer's own
        projections, so any attention backend works.
        """
        return self.query_key(rows)

    def attention_from(self, rows: torch.Tensor, rows_valid: torch.Tensor | None = None, chunk_size: int = 512,
                       key_bias: bool = True) -> torch.Tensor:
        """Attention every slot receives from the query slots `rows` [B, R], head- and query-averaged.

        rows_valid [B, R] bool marks real query rows. key_bias: include the model's log(size) bias of merged
        tokens (the attention it paid); False: the unbiased q/k attention. -> [B, N] float32.
        """
        queries, keys, scale = self.queries_keys(rows)
        key_pos = self.index
        query_pos = torch.gather(key_pos, 1, rows)
        bias = None if self.key_bias is None or not key_bias else gather_slots(self.key_bias, self.index, fill=0.0)
        return received_attention(queries, keys, query_pos, key_pos, self.present, scale, query_valid=rows_valid,
                                  chunk_size=chunk_size, key_bias=bias)

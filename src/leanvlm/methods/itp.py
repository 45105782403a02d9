"""ITP: image-text interaction pruning (Yu, Chen, Xu, arXiv 2409.01162), as specified in SPEC section 2.

Two stages:
1. `InflectionCut` (in the vision encoder, before the LLM): score every patch of an image / frame by its
   similarity to the vision CLS token — default the CLS query's attention to the patch keys in the
   layer the projector reads (LLaVA: the penultimate), head-averaged and recomputed from that layer's
   q/k; option "cosine": cosine similarity of CLS and patch hidden states. Sort descending and cut at
   the curve's inflection point found per frame ("kneedle" by default; "second_difference",
   "largest_drop"), clamped to [k_min, N]. The top-k patches are kept in original order, so every
   sample of a batch gets its own token count.
2. `TextRelevancePrune` (inside the LLM, after layer K=2): every token's relevance = the attention it
   receives from the instruction tokens (the text after the last visual token: question + assistant
   prefix), head- and query-averaged. Keep the `text_keep` fraction of the remaining visual tokens.
   With `prune_text=True`, text tokens whose relevance is below `text_threshold` x the mean relevance of
   the text tokens are dropped too, except the last `protect_last` tokens (the assistant prefix and the
   last token; default 8 covers the chat templates of the supported families) and the instruction.

Deviations (the paper's text is not public in full; this is the SPEC's version): towers without a CLS
token (SigLIP in LLaVA-OneVision, Qwen2-VL) use the mean token as the query / reference vector, and
`SampleStats.details["cls_substitute"]` says so; the text-pruning threshold rule is ours.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from leanvlm.methods.base import LLMStage, Method, PreLLMStage, Selection, check_fraction, keep_count
from leanvlm.ops.knee import KneeMethod, find_knee_batched
from leanvlm.ops.select import pack_right, top_k_mask
from leanvlm.runtime.context import LayerContext
from leanvlm.runtime.visual import VisualItem

Similarity = Literal["attention", "cosine"]
_SIGNAL = {"attention": "cls_attention", "cosine": "cls_similarity"}
_KNEES = ("kneedle", "second_difference", "largest_drop")


@dataclass
class InflectionCut(PreLLMStage):
    """Keep, per frame, the patches above the inflection point of their sorted CLS-similarity curve."""

    knee: KneeMethod = "kneedle"
    k_min: int = 8
    similarity: Similarity = "attention"

    def __post_init__(self) -> None:
        if self.knee not in _KNEES:
            raise ValueError(f"knee must be one of {', '.join(_KNEES)} or None, got {self.knee!r}")
        if isinstance(self.k_min, bool) or not isinstance(self.k_min, int) or self.k_min < 1:
            raise ValueError(f"k_min must be an int >= 1, got {self.k_min!r}")
        if self.similarity not in _SIGNAL:
            raise ValueError(f"similarity must be 'attention' or 'cosine', got {self.similarity!r}")
        self.needs = frozenset({_SIGNAL[self.similarity]})

    def reduce(self, item: VisualItem) -> VisualItem:
        scores = item.signals[_SIGNAL[self.similarity]]  # [F, h*w], original patch order
        # A frame already reduced by an earlier stage is scored on its surviving patches only.
        frame_scores = [s[origin] for s, origin in zip(scores, item.origin)]
        keep_indices, knees = [], []
        for values in frame_scores:
            k = find_knee_batched(values[None], self.knee, k_min=self.k_min)  # [1]
            chosen = top_k_mask(values[None], torch.ones_like(values[None], dtype=torch.bool), k)
            keep_indices.append(chosen[0].nonzero().squeeze(1))
            knees.append(int(k))
        reduced = item.select(keep_indices)
        reduced.info = {**item.info, "knee": knees if len(knees) > 1 else knees[0]}
        return reduced

    def planned_tokens(self, tokens_per_frame: int) -> int:
        """Input-dependent; estimate: the SPEC's reported average of ~22% of the tokens (at least k_min)."""
        return min(tokens_per_frame, max(self.k_min, round(0.22 * tokens_per_frame)))


@dataclass
class TextRelevancePrune(LLMStage):
    """After `layer`, keep `visual_keep` of the visual tokens by the attention the instruction pays them."""

    layer: int = 2
    visual_keep: float = 0.5
    prune_text: bool = False
    text_threshold: float = 0.5
    protect_last: int = 8

    def layers(self, num_layers: int) -> list[int]:
        return [self.layer]

    def select(self, ctx: LayerContext) -> Selection:
        rows = pack_right(ctx.question)
        relevance = ctx.attention_from(rows.clamp(min=0), rows >= 0)  # [B, N]
        visual = ctx.visual
        keep_visual = top_k_mask(relevance, visual, keep_count(self.visual_keep, visual.sum(dim=1)))
        candidates, kept = visual, keep_visual
        if self.prune_text:
            length = ctx.index.shape[1]
            tail = torch.arange(length, device=ctx.index.device) >= length - self.protect_last
            text = ctx.present & ~visual & ~ctx.question & ~tail[None]
            text_tokens = ctx.present & ~visual
            mean_text = (relevance * text_tokens).sum(dim=1) / text_tokens.sum(dim=1).clamp(min=1)
            kept_text = text & (relevance >= self.text_threshold * mean_text[:, None])
            candidates, kept = visual | text, keep_visual | kept_text
        # The decision is made here; express it as scores so the runtime keeps exactly `kept`.
        return Selection(kept.float(), candidates, kept.sum(dim=1))

    def planned_keep(self, layer: int, num_layers: int, visual_into_llm: int, visual_now: int) -> int:
        return max(1, round(self.visual_keep * visual_now)) if visual_now else 0


@dataclass
class ITP(Method):
    """ITP: per-frame inflection-point cut in the vision encoder, then text-relevance pruning after
    decoder layer `layer`. `knee=None` disables stage 1; `text_keep=1.0` (and prune_text=False)
    disables stage 2."""

    knee: KneeMethod | None = "kneedle"
    k_min: int = 8
    similarity: Similarity = "attention"
    layer: int = 2
    text_keep: float = 0.5
    prune_text: bool = False
    text_threshold: float = 0.5

    def __post_init__(self) -> None:
        check_fraction("text_keep", self.text_keep)
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"layer must be a decoder layer index >= 0, got {self.layer!r}")
        if self.knee is not None:
            InflectionCut(self.knee, self.k_min, self.similarity)  # validates early

    def stages(self) -> tuple[Sequence[PreLLMStage], Sequence[LLMStage]]:
        pre = [InflectionCut(self.knee, self.k_min, self.similarity)] if self.knee is not None else []
        prune = self.text_keep < 1.0 or self.prune_text
        llm = [TextRelevancePrune(self.layer, self.text_keep, self.prune_text, self.text_threshold)] if prune else []
        return pre, llm

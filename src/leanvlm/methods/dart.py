"""DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters
More", arXiv 2502.11494), inside the LLM after one shallow decoder layer:

After decoder layer `layer` (0-indexed), each sample keeps K = max(1, round(keep * V)) of its V visual tokens:
1. Pivots: the `pivot_image` visual tokens and the `pivot_text` instruction tokens (the text after the last
   visual token) whose keys at that layer (heads concatenated) have the largest L2 norm.
2. Duplicates removed: the image pivots are kept; then, pivot by pivot in ascending position, each pivot
   takes its quota of the not-yet-taken visual tokens LEAST cosine-similar to it (hidden states at the
   layer's output, `ops.diversity.dissimilar_to_pivots`); the K - pivot_image picks are shared as evenly as
   possible over the pivots (earlier pivots take the remainder). Everything else visual is dropped for the
   later layers (text pivots are never dropped: text is not a candidate).

Defaults (the published LLaVA-1.5 setting): pivot_image = 4, pivot_text = 4, keep = 128 / 576 (reduction
ratio 0.778), layer = 1: the code's K = 2 prunes before decoder layer 2 using layer 1's output, i.e. our
convention's layer 1 (layers 0..layer see every token, like `FastV`).

Deviations from the published code (read for facts only, not copied):
- Exact budget: the code gives every pivot floor(M / P) tokens, keeping pivot_image + P floor(M / P)
  (132 for M = 128); here the pivots share K - pivot_image, so exactly K are kept.
- Pivot keys are ranked by their L2 norm, not the code's L1 norm: RoPE rotates every pair of key channels
  by an angle set by the absolute position, which leaves the L2 norm unchanged but not the L1 norm, so with
  L1 the pivots of a left-padded sample would differ from the same sample alone (the code runs batch 1).
- Pivots are visited in ascending position (the code walks a Python set, i.e. hash-slot order).
- Cosine similarity of the raw layer output (the code applies the final RMSNorm first; its per-channel
  weight changes the angles slightly).
- Per sample of a batch (the code handles batch size 1); pivots are clamped to the tokens that exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from leanvlm.methods.base import LLMStage, Method, PreLLMStage, Selection, check_fraction, keep_count
from leanvlm.methods.fastv import single_drop_budget
from leanvlm.ops.diversity import dissimilar_to_pivots
from leanvlm.runtime.context import LayerContext

PAPER_KEEP = 128 / 576
PAPER_LAYER = 1
PAPER_PIVOTS = 4


def pivot_quotas(picks: int, pivots: int) -> list[int]:
    """Share `picks` tokens over `pivots` pivots as evenly as possible, the earlier pivots taking the remainder."""
    base, extra = divmod(picks, pivots)
    return [base + (p < extra) for p in range(pivots)]


def dart_keep(hidden: torch.Tensor, keys: torch.Tensor, visual: torch.Tensor, question: torch.Tensor, count: int,
              pivot_image: int, pivot_text: int) -> torch.Tensor:
    """One sample's kept visual tokens. hidden [N, D] layer output, keys [N, K] (heads concatenated), visual /
    question [N] bool, count: visual tokens to keep -> [N] bool (True = a kept visual token)."""
    kept = torch.zeros_like(visual)
    if count >= int(visual.sum()):
        return kept | visual
    norms = torch.linalg.vector_norm(keys.float(), dim=-1)  # [N] L2 norm of each token's key (RoPE-invariant)
    image_pivots = torch.sort(norms.masked_fill(~visual, float("-inf")), descending=True, stable=True).indices
    image_pivots = image_pivots[: min(pivot_image, count)]
    text_pivots = torch.sort(norms.masked_fill(~question, float("-inf")), descending=True, stable=True).indices
    text_pivots = text_pivots[: min(pivot_text, int(question.sum()))]
    pivots = torch.sort(torch.cat([image_pivots, text_pivots])).values  # ascending position
    kept[image_pivots] = True
    candidates = visual & ~kept
    picks = dissimilar_to_pivots(hidden, hidden[pivots], candidates, pivot_quotas(count - image_pivots.numel(), pivots.numel()))
    kept[picks] = True
    return kept


@dataclass
class DuplicateAwareDrop(LLMStage):
    """DART's in-LLM stage (see the module doc)."""

    layer: int = PAPER_LAYER
    keep: float = PAPER_KEEP
    pivot_image: int = PAPER_PIVOTS
    pivot_text: int = PAPER_PIVOTS

    def layers(self, num_layers: int) -> list[int]:
        return [self.layer]

    def select(self, ctx: LayerContext) -> Selection:
        _, keys, _ = ctx.queries_keys(ctx.last_slot)  # keys [B, Hkv, N, d]; one query row only (unused)
        keys = keys.transpose(1, 2).flatten(2)  # [B, N, Hkv * d]
        visual, question = ctx.visual, ctx.question
        counts = keep_count(self.keep, visual.sum(dim=1))
        kept = torch.stack([dart_keep(ctx.hidden[b], keys[b], visual[b], question[b], int(counts[b]), self.pivot_image,
                                      self.pivot_text) for b in range(visual.shape[0])])
        # The decision is made here; express it as scores so the runtime keeps exactly `kept`.
        return Selection(kept.float(), visual, kept.sum(dim=1))

    def planned_keep(self, layer: int, num_layers: int, visual_into_llm: int, visual_now: int) -> int:
        return max(1, round(self.keep * visual_now)) if visual_now else 0


@dataclass
class DART(Method):
    """DART: after decoder layer `layer` (default 1, the paper's K=2), keep `keep` of the visual tokens: the
    key-norm pivots and the tokens least similar to them. See the module doc for deviations."""

    layer: int = PAPER_LAYER
    keep: float = PAPER_KEEP
    pivot_image: int = PAPER_PIVOTS
    pivot_text: int = PAPER_PIVOTS

    def __post_init__(self) -> None:
        check_fraction("keep", self.keep)
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"layer must be a decoder layer index >= 0, got {self.layer!r}")
        for name, minimum in (("pivot_image", 1), ("pivot_text", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")

    def stages(self) -> tuple[Sequence[PreLLMStage], Sequence[LLMStage]]:
        return (), (DuplicateAwareDrop(self.layer, self.keep, self.pivot_image, self.pivot_text),)

    @classmethod
    def budget_options(cls, keep_fraction: float, num_layers: int) -> dict[str, float | int]:
        """Visual-token budget -> (layer, keep) as for FastV: layers 0..layer see all, the rest keep `keep`."""
        return single_drop_budget("DART", keep_fraction, num_layers, PAPER_LAYER)

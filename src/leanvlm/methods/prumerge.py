"""LLaVA-PruMerge and PruMerge+ (Shang et al., "LLaVA-PruMerge: Adaptive Token Reduction for Efficient
Large Multimodal Models", arXiv 2403.15388), before the LLM, per image / video frame:

1. Adaptive selection: the CLS token's attention to every patch (vision layer the projector reads,
   head-averaged); the kept patches are the IQR outliers, score > Q3 + 1.5 (Q3 - Q1), with quartiles taken
   PER IMAGE / FRAME (`ops.outliers`). The count therefore differs per sample. At least `min_tokens`
   (default 1, the top-scored patch) are kept when a frame has no outlier.
2. PruMerge+ (`plus=True`, or `PruMergePlus`): adds `spatial` (default 3) spatially uniform samples per
   outlier, spread evenly over the not-yet-kept patches in raster order (`ops.sample.evenly_spaced`), so
   a frame keeps min(T, 4 k) tokens for k outliers.
3. Merging: every kept token absorbs its `neighbors` (default 32, clamped to what exists) most similar
   PRUNED patches by key cosine similarity (same vision layer), weighted by CLS attention: the kept
   token becomes (a_i y_i + sum_j a_j y_j) / (a_i + sum_j a_j). Neighbourhoods may overlap (k-NN, not a
   partition); `groups` records each absorbed patch under the kept token most similar to it.

Fixed-budget variant (not in the paper; for equal-budget sweeps): `keep=f` replaces the adaptive count
by K = max(1, round(f * T)) per frame: the top K by CLS attention, or with plus the top round(K / 4)
(at least 1) plus K - that many spatial samples (the paper's 1 : 3 mix). Merging is unchanged.
`keep=1.0` keeps every token unchanged.

Planned tokens (for `leanvlm.flops`): adaptive counts are input-dependent, so the plan is the paper's
reported LLaVA-1.5 average, 32 of 576 (5.5%) per frame, times (1 + spatial) with plus; with `keep`, the
exact K.

Deviations from the published code (which we read for facts only):
- Quartiles per image / frame (the code pools the CLS attention of the whole batch: one threshold for
  all images of a batch, so a sample's count depends on its batch-mates).
- The CLS attention is head-averaged from the layer the projector reads (the code uses the last vision
  layer's q/k as a single head); SigLIP-like towers without CLS use the mean token (`models.vision`).
- Merging is a normalised attention-weighted mean over pruned neighbours only; the code adds the
  un-normalised attention-weighted sum of the 32 nearest of ALL other tokens (kept ones included) to the
  kept token and appends one extra token (the attention-weighted sum of all pruned tokens), not done here.
- Tokens are merged after the projector (the code merges vision features before it); outputs keep raster
  order; "+" samples are evenly spaced over the not-kept patches (the code takes an arithmetic sequence
  over the whole grid with stride (T // k) // 3 and drops the ones already kept).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from leanvlm.methods._frames import FrameGroups, frame_signal, rebuild
from leanvlm.methods.base import LLMStage, Method, PreLLMStage, check_fraction
from leanvlm.ops.outliers import iqr_outliers
from leanvlm.ops.pool import combine
from leanvlm.ops.sample import evenly_spaced
from leanvlm.runtime.visual import VisualItem

#: The paper's reported average for LLaVA-1.5: 32 of 576 visual tokens (5.5%), used as the analytic plan.
PAPER_AVERAGE_FRACTION = 32 / 576


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


@dataclass
class OutlierPruneMerge(PreLLMStage):
    """PruMerge(+)'s pre-LLM stage (see the module doc)."""

    plus: bool = False
    keep: float | None = None
    neighbors: int = 32
    iqr_factor: float = 1.5
    spatial: int = 3
    min_tokens: int = 1

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"cls_attention", "keys"})

    def planned_tokens(self, tokens_per_frame: int) -> int:
        if tokens_per_frame == 0:
            return 0
        if self.keep is not None:
            return min(tokens_per_frame, max(1, round(self.keep * tokens_per_frame)))
        fraction = PAPER_AVERAGE_FRACTION * (1 + self.spatial if self.plus else 1)
        return min(tokens_per_frame, max(self.min_tokens, round(fraction * tokens_per_frame)))

    def select(self, attention: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Kept positions of one frame from its CLS attention [T] -> ([T] bool, how many were chosen by
        score: the IQR outliers (at least min_tokens), or the top ones with `keep`)."""
        tokens = attention.shape[0]
        order = torch.sort(attention, descending=True, stable=True).indices
        kept = torch.zeros(tokens, dtype=torch.bool, device=attention.device)
        if self.keep is None:
            kept = iqr_outliers(attention[None], self.iqr_factor)[0]
            if int(kept.sum()) < self.min_tokens:
                kept[order[: min(self.min_tokens, tokens)]] = True
            top = int(kept.sum())
            extra = min(self.spatial * top, tokens - top) if self.plus else 0
        else:
            budget = min(tokens, max(1, round(self.keep * tokens)))
            top = max(1, round(budget / (1 + self.spatial))) if self.plus else budget
            kept[order[:top]] = True
            extra = budget - top
        if extra:
            kept[evenly_spaced(~kept, extra)] = True
        return kept, top

    def reduce(self, item: VisualItem) -> VisualItem:
        """Reduce every frame; reports per item `info["prumerge_by_score"]`: the tokens chosen by CLS attention
        (IQR outliers, or the top ones with `keep`) per frame (an int for a single image), before "+" samples."""
        chosen: list[int] = []
        results = [self._frame(item, f, chosen) for f in range(len(item.frames))]
        info = {**item.info, "prumerge_by_score": chosen if len(chosen) > 1 else chosen[0]} if chosen else item.info
        if all(r is None for r in results):
            return replace(item, info=info)
        reduced = rebuild(item, [FrameGroups.identity(frame) if r is None else r for frame, r in zip(item.frames, results)])
        return replace(reduced, info=info)

    def _frame(self, item: VisualItem, f: int, chosen: list[int]) -> FrameGroups | None:
        frame = item.frames[f]
        tokens = frame.shape[0]
        if tokens == 0:
            chosen.append(0)
            return None
        attention = frame_signal(item, "cls_attention", f, "PruMerge").float()
        kept_mask, by_score = self.select(attention)
        chosen.append(by_score)
        if bool(kept_mask.all()):
            return None
        device = frame.device
        kept = kept_mask.nonzero().squeeze(1)
        pruned = (~kept_mask).nonzero().squeeze(1)
        count = kept.numel()
        assignment = torch.full((tokens,), -1, dtype=torch.long, device=device)
        assignment[kept] = torch.arange(count, device=device)
        neighbours = min(self.neighbors, pruned.numel())
        if neighbours == 0:
            return FrameGroups(frame[kept], kept, assignment)
        keys = frame_signal(item, "keys", f, "PruMerge").float()
        keys = keys / torch.linalg.vector_norm(keys, dim=-1, keepdim=True).clamp(min=1e-12)
        similarity = keys[kept] @ keys[pruned].T  # [K, P]
        nearest = torch.sort(similarity, dim=1, descending=True, stable=True).indices[:, :neighbours]  # [K, n]
        member = torch.zeros_like(similarity, dtype=torch.bool).scatter_(1, nearest, True)  # [K, P]
        weights = torch.zeros(count, tokens, dtype=torch.float32, device=device)
        weights[torch.arange(count, device=device), kept] = attention[kept]
        weights[:, pruned] = torch.where(member, attention[pruned][None, :], 0.0)
        empty = weights.sum(dim=1) <= 0  # attention underflowed to 0 everywhere: the kept token stays as is
        weights[empty.nonzero().squeeze(1), kept[empty]] = 1.0
        merged = combine(frame, weights)
        absorbed = member.any(dim=0)
        owner = similarity.masked_fill(~member, float("-inf")).argmax(dim=0)  # most similar absorbing token
        assignment[pruned] = torch.where(absorbed, owner, -1)
        return FrameGroups(merged, kept, assignment)


@dataclass
class PruMerge(Method):
    """LLaVA-PruMerge (plus=False) / PruMerge+ (plus=True): adaptive IQR selection of CLS attention per
    image / frame, neighbour merging by key similarity; `keep` switches to a fixed per-frame budget.
    See the module doc for defaults and deviations."""

    plus: bool = False
    keep: float | None = None
    neighbors: int = 32
    iqr_factor: float = 1.5
    spatial: int = 3
    min_tokens: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.plus, bool):
            raise ValueError(f"plus must be True or False, got {self.plus!r}")
        if self.keep is not None:
            check_fraction("keep", self.keep)
        _check_int("neighbors", self.neighbors, 0)
        _check_int("spatial", self.spatial, 0)
        _check_int("min_tokens", self.min_tokens, 1)
        factor = self.iqr_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 0 or factor == float("inf"):
            raise ValueError(f"iqr_factor must be a finite number >= 0, got {factor!r}")

    def stages(self) -> tuple[Sequence[PreLLMStage], Sequence[LLMStage]]:
        return (OutlierPruneMerge(self.plus, self.keep, self.neighbors, self.iqr_factor, self.spatial, self.min_tokens),), ()

    @classmethod
    def budget_options(cls, keep_fraction: float, num_layers: int) -> dict[str, float]:
        """Visual-token budget -> the fixed-budget variant keep = budget (the adaptive count has no knob)."""
        return {"keep": keep_fraction}


@dataclass
class PruMergePlus(PruMerge):
    """PruMerge+ : `PruMerge(plus=True)` (registry name "prumerge+")."""

    plus: bool = True

"""Pool: uniform spatial average pooling of every frame's patch grid before the LLM (a baseline, SPEC 3).

Each image / video frame's (h, w) patch grid is average-pooled to the grid `ops.pool.pooled_grid` picks:
each side scaled by sqrt(keep) and rounded half up, clamped to [1, side] (aspect ratio kept). So the kept
fraction is only approximately `keep`: 24 x 24 -> 12 x 12 at 0.25 (exact), 17 x 17 at 0.5 (50.2%), 8 x 8
at 1/9; on a 4 x 4 grid 0.5 gives 3 x 3 (56%). Bins are contiguous and non-overlapping, sizes differing by
at most one (`ops.pool.pool_assignment`: 24 -> 17 gives bins of 1 and 2 rows). Each pooled token is the
plain mean of its bin and stands for the bin's first (top-left) surviving patch.

If an earlier stage already reduced the frame, each remaining token is binned by the patch it stands for
(`origin`); empty bins are dropped. Frames whose grid is not h x w with h * w tokens (e.g. a model
family with per-row newline tokens) must pass `grid` correctly; the LLaVA adapter gives the square grid.
`planned_tokens(T)` assumes a square grid (isqrt(T)^2 == T), otherwise a 1 x T row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from leanvlm.methods._frames import FrameGroups, rebuild
from leanvlm.methods.base import LLMStage, Method, PreLLMStage, check_fraction
from leanvlm.ops.pool import assignment_weights, combine, pool_assignment, pooled_grid
from leanvlm.runtime.visual import VisualItem


def _square(tokens: int) -> tuple[int, int]:
    side = math.isqrt(tokens)
    return (side, side) if side * side == tokens else (1, tokens)


@dataclass
class GridPool(PreLLMStage):
    """Average-pool every frame's patch grid to about `keep` of its tokens."""

    keep: float = 0.25

    def planned_tokens(self, tokens_per_frame: int) -> int:
        if tokens_per_frame == 0:
            return 0
        h, w = pooled_grid(_square(tokens_per_frame), self.keep)
        return h * w

    def reduce(self, item: VisualItem) -> VisualItem:
        out_grid = pooled_grid(item.grid, self.keep)
        if out_grid == tuple(item.grid):
            return item
        cells = pool_assignment(item.grid, out_grid, device=item.frames[0].device)  # [h*w]
        results = []
        for frame, origin in zip(item.frames, item.origin):
            cell = cells[origin]  # bin of every current token
            used, slot = torch.unique(cell, sorted=True, return_inverse=True)
            weights = assignment_weights(slot, used.numel())
            representative = torch.argmax(weights, dim=1)  # first token of each bin (origins ascend)
            results.append(FrameGroups(combine(frame, weights), representative, slot))
        return rebuild(item, results)


@dataclass
class Pool(Method):
    """Average-pool each frame's patch grid to the nearest grid with about `keep` (default 0.25) of the tokens."""

    keep: float = 0.25

    def __post_init__(self) -> None:
        check_fraction("keep", self.keep)

    def stages(self) -> tuple[Sequence[PreLLMStage], Sequence[LLMStage]]:
        return (GridPool(self.keep),), ()

    @classmethod
    def budget_options(cls, keep_fraction: float, num_layers: int) -> dict[str, float]:
        """Visual-token budget -> keep = budget (the grid rounding makes the realised fraction approximate)."""
        return {"keep": keep_fraction}

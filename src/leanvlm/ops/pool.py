"""Grouping tokens: spatial pooling of a patch grid, and weighted combination of tokens into groups.

- `pooled_grid(grid, keep)`: the (h', w') grid that keeps about `keep` of the h * w cells (per-side
  rounding, see its doc).
- `pool_assignment(grid, out_grid)`: which output cell every input cell falls in, for non-overlapping
  bins (a partition of the grid: every input cell in exactly one bin, no empty bin).
- `assignment_weights(assignment, groups, weights)`: the [K, T] matrix of a partition (or a subset of it).
- `combine(x, weights)`: rows of a [K, T] weight matrix turn T tokens into K weighted means; groups may
  overlap (PruMerge's neighbourhoods) or partition the tokens (pooling, VisionZip's contextual tokens).
"""

from __future__ import annotations

import math

import torch


def pooled_grid(grid: tuple[int, int], keep: float) -> tuple[int, int]:
    """The pooled grid that keeps about `keep` of the cells of `grid` = (h, w), aspect ratio kept.

    Each side scales by sqrt(keep) and rounds half up, clamped to [1, side]:
    h' = min(h, max(1, floor(h * sqrt(keep) + 0.5))), the same for w. So 24 x 24 at keep 0.25 -> 12 x 12
    (144 = 25%), at 1/9 -> 8 x 8 (64), at 0.5 -> 17 x 17 (289 = 50.2%); 4 x 4 at 0.5 -> 3 x 3 (9 = 56%).
    keep = 1 gives the grid itself. Raises ValueError unless 0 < keep <= 1 and h, w >= 1.
    """
    h, w = grid
    if not (isinstance(keep, (int, float)) and not isinstance(keep, bool) and math.isfinite(keep) and 0 < keep <= 1):
        raise ValueError(f"keep must be in (0, 1], got {keep!r}")
    if h < 1 or w < 1:
        raise ValueError(f"grid sides must be >= 1, got {grid}")
    scale = math.sqrt(keep)
    return tuple(min(side, max(1, math.floor(side * scale + 0.5))) for side in (h, w))  # type: ignore[return-value]


def pool_assignment(grid: tuple[int, int], out_grid: tuple[int, int], device: torch.device | str | None = None) -> torch.Tensor:
    """Output cell (row-major in out_grid) of every cell of grid (row-major) -> [h * w] long.

    Row r goes to output row floor(r * h' / h) (columns likewise): contiguous, non-overlapping bins whose
    sizes differ by at most one (5 rows into 2: sizes 3, 2). Needs 1 <= h' <= h and 1 <= w' <= w (every
    output cell then gets at least one input cell).
    """
    (h, w), (ho, wo) = grid, out_grid
    if not (1 <= ho <= h and 1 <= wo <= w):
        raise ValueError(f"out_grid {out_grid} must be between (1, 1) and grid {grid}")
    rows = torch.arange(h, device=device) * ho // h
    cols = torch.arange(w, device=device) * wo // w
    return (rows[:, None] * wo + cols[None, :]).reshape(-1)


def assignment_weights(assignment: torch.Tensor, groups: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weight matrix [groups, T] of a partition: entry (g, t) = weights[t] if assignment[t] == g else 0.

    assignment [T] long, -1 = token in no group; weights [T] (default 1). float32 (or weights' dtype if wider).
    """
    dtype = torch.float32 if weights is None else torch.promote_types(weights.dtype, torch.float32)
    values = torch.ones(assignment.shape, dtype=dtype, device=assignment.device) if weights is None else weights.to(dtype)
    matrix = torch.zeros(groups + 1, assignment.shape[0], dtype=dtype, device=assignment.device)
    slot = torch.where(assignment >= 0, assignment, groups)  # unassigned tokens land in a spare last row
    matrix[slot, torch.arange(assignment.shape[0], device=assignment.device)] = values
    return matrix[:groups]


def combine(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted means: out[k] = sum_t weights[k, t] x[t] / sum_t weights[k, t].

    x [T, C] (or [B, T, C]), weights [K, T] (or [B, K, T]), non-negative, every row with a positive sum.
    Accumulates in at least float32 and returns x's dtype. -> [K, C] (or [B, K, C]).
    """
    acc = torch.promote_types(torch.promote_types(x.dtype, weights.dtype), torch.float32)
    weights = weights.to(acc)
    total = weights.sum(dim=-1, keepdim=True)
    if bool((total <= 0).any()):
        raise ValueError("every group needs a positive total weight")
    return ((weights @ x.to(acc)) / total).to(x.dtype)

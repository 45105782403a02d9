"""ITP's per-sample cut at the inflection point of a sorted score curve (SPEC 2a).

Scores are sorted descending, s_1 >= ... >= s_N, and normalised to y_i = (s_i - s_N) / (s_1 - s_N).
Every method returns k = the NUMBER OF TOKENS KEPT (the top k, i.e. the 1-based index of the last kept
sorted score), clamped to [k_min, N]:
- "kneedle" (default): x_i = (i - 1) / (N - 1), k = argmax_i (1 - x_i - y_i): the point farthest below
  the chord from (0, 1) to (1, 0).
- "second_difference": k = argmax_{1 < i < N} (y_{i-1} - 2 y_i + y_{i+1}): the sharpest bend, kept.
- "largest_drop": k = argmax_{i < N} (y_i - y_{i+1}): cut right after the largest gap.
Note that on a smooth convex decay (e.g. exponential) the last two put their maximum at the very start
(k = 2 and k = 1): they only suit curves with a sharp corner or gap, and rely on k_min there. kneedle
finds the point where the slope equals the chord's slope on such curves.

Defined degenerate results (shared by all methods): maxima equal within 1e-6 (normalised units) are
ties, and ties keep MORE tokens (largest k); a curve without a knee keeps all N: all scores equal, or a
straight line for every method, or a concave curve for kneedle and second_difference (largest_drop
cuts a concave curve before its last, largest drop: k = N - 1); N = 1 gives 1; N < 3
has no interior point for "second_difference" and keeps all; NaN or inf in a (valid) score raises
ValueError.
"""

from __future__ import annotations

from typing import Literal

import torch

KneeMethod = Literal["kneedle", "second_difference", "largest_drop"]

# Below this (in normalised y units) a maximum is rounding noise of a straight line, not a knee.
_NO_KNEE_TOLERANCE = 1e-6


def find_knee_batched(
    scores: torch.Tensor,
    method: KneeMethod = "kneedle",
    k_min: int = 1,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row cut k (tokens kept) for scores [B, N] -> int64 [B].

    valid [B, N] bool (default all True) excludes slots, e.g. padding when rows have different token
    counts; row b then behaves exactly like its n_b valid scores alone, and is clamped to [k_min, n_b]
    (a row without valid scores gives 0). Order of the scores within a row does not matter.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, N], got shape {tuple(scores.shape)}")
    if k_min < 1:
        raise ValueError(f"k_min must be >= 1, got {k_min}")
    if valid is None:
        valid = torch.ones_like(scores, dtype=torch.bool)
    elif valid.shape != scores.shape:
        raise ValueError(f"valid must match scores {tuple(scores.shape)}, got {tuple(valid.shape)}")
    # float64: normalisation of float32 scores with a tiny range must not create a fake knee
    s = scores.double()
    bad_rows = (~torch.isfinite(s) & valid).any(dim=1)
    if bad_rows.any():
        raise ValueError(f"scores contain NaN or inf (rows {bad_rows.nonzero().flatten().tolist()})")

    length = s.shape[1]
    count = valid.sum(dim=1)  # [B]
    if length == 0:
        return count
    s = s.masked_fill(~valid, float("-inf")).sort(dim=1, descending=True).values
    position = torch.arange(length, device=s.device)  # 0-based i - 1
    in_row = position[None] < count[:, None]
    first = s[:, :1]
    last = s.gather(1, (count - 1).clamp(min=0)[:, None])
    span = (first - last).squeeze(1)
    has_span = span > 0
    y = torch.where(in_row & has_span[:, None], (s - last) / span.clamp(min=1e-300)[:, None], 0.0)

    # A knee must beat what a straight line scores: 0 for the first two statistics; for drops, the
    # mean normalised drop 1 / (n - 1), which every drop of a straight line equals.
    no_knee_level = torch.zeros(count.shape, dtype=s.dtype, device=s.device)
    if method == "kneedle":
        x = position[None].double() / (count[:, None] - 1).clamp(min=1)
        statistic, candidate = 1.0 - x - y, in_row
    elif method == "second_difference":
        statistic = torch.zeros_like(y)
        statistic[:, 1:-1] = y[:, :-2] - 2.0 * y[:, 1:-1] + y[:, 2:]
        candidate = (position[None] >= 1) & (position[None] <= count[:, None] - 2)
    elif method == "largest_drop":
        statistic = torch.zeros_like(y)
        statistic[:, :-1] = y[:, :-1] - y[:, 1:]
        candidate = position[None] <= count[:, None] - 2
        no_knee_level = 1.0 / (count - 1).clamp(min=1)
    else:
        raise ValueError(f"unknown knee method {method!r}; use 'kneedle', 'second_difference' or 'largest_drop'")

    statistic = statistic.masked_fill(~candidate, float("-inf"))
    best = statistic.max(dim=1, keepdim=True).values
    # Ties keep more tokens: the last point within the tolerance of the maximum, so that float noise
    # between equal steps (e.g. a piecewise-linear curve's equal drops) cannot pick an arbitrary one.
    near_best = statistic >= best - _NO_KNEE_TOLERANCE
    k = length - near_best.flip(1).to(torch.uint8).argmax(dim=1)  # 1-based position = tokens kept
    k = torch.where(has_span & (best.squeeze(1) > no_knee_level + _NO_KNEE_TOLERANCE), k, count)
    return torch.minimum(k.clamp(min=k_min), count)


def find_knee(scores: torch.Tensor, method: KneeMethod = "kneedle", k_min: int = 1) -> int:
    """Cut k (number of top scores kept) for a 1-D score vector [N]; see the module docstring."""
    if scores.dim() != 1 or scores.numel() == 0:
        raise ValueError(f"scores must be a non-empty 1-D tensor, got shape {tuple(scores.shape)}")
    return int(find_knee_batched(scores[None], method, k_min)[0])

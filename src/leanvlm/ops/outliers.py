"""Interquartile-range outliers (PruMerge's adaptive selection, Shang et al., arXiv 2403.15388).

Per row, the upper Tukey fence is Q3 + factor * (Q3 - Q1) with quartiles by linear interpolation between
order statistics (numpy.percentile's default, which the published PruMerge code uses); a score is an
outlier when it is strictly above the fence. Only high outliers count: the method keeps the patches the
CLS token attends to unusually strongly.
"""

from __future__ import annotations

import torch


def iqr_upper_fence(scores: torch.Tensor, factor: float = 1.5) -> torch.Tensor:
    """Q3 + factor * (Q3 - Q1) per row of scores [B, T] (computed in float64) -> [B] float64."""
    if scores.dim() != 2 or scores.shape[1] == 0:
        raise ValueError(f"need scores [B, T] with T >= 1, got {tuple(scores.shape)}")
    if not factor >= 0:
        raise ValueError(f"factor must be >= 0, got {factor!r}")
    values = scores.double()
    q1, q3 = torch.quantile(values, torch.tensor([0.25, 0.75], dtype=torch.float64, device=scores.device), dim=1)
    return q3 + factor * (q3 - q1)


def iqr_outliers(scores: torch.Tensor, factor: float = 1.5) -> torch.Tensor:
    """Mask of the high outliers of every row: scores [B, T] -> [B, T] bool, True where score > fence.

    Each row is its own population (per sample / per frame), never the whole batch.
    Example: [1, 2, 3, 4, 100] has Q1 = 2, Q3 = 4, fence 4 + 1.5 * 2 = 7, so only 100 is an outlier.
    """
    fence = iqr_upper_fence(scores, factor)
    return scores.double() > fence[:, None]

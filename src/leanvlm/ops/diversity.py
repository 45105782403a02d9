"""Diverse subsets of a set of token vectors: the selection rules of DivPrune, CDPruner, VisPruner and DART.

Pure tensor functions of one image / frame (no batch dimension, no model knowledge). Every function returns
positions into its input; ties go to the earlier position (`torch.argmax` / stable sorts).
"""

from __future__ import annotations

import torch


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length in float32 (a zero row stays zero). [T, C] -> [T, C]."""
    x = x.float()
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp(min=1e-12)


def cosine_similarity_matrix(x: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity. x [T, C] -> [T, T] float32."""
    unit = _unit(x)
    return unit @ unit.T


def _check_count(count: int, available: int) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= available:
        raise ValueError(f"count must be an int in [0, {available}], got {count!r}")


def max_min_diverse(x: torch.Tensor, count: int) -> torch.Tensor:
    """Greedy max-min diversity (DivPrune): `count` rows of x [T, C], in pick order -> [count] long.

    Distance d(i, j) = 1 - cos(x_i, x_j). The first pick is the row farthest from its nearest other row
    (max_j min_{i != j} d); every later pick is the row farthest from the picks so far (max_j min_{i in S} d).
    """
    tokens = x.shape[0]
    _check_count(count, tokens)
    picks = torch.empty(count, dtype=torch.long, device=x.device)
    if count == 0:
        return picks
    if tokens == 1:
        return torch.zeros(1, dtype=torch.long, device=x.device)
    distance = 1.0 - cosine_similarity_matrix(x)  # [T, T]
    to_others = distance.clone()
    to_others.fill_diagonal_(float("inf"))
    picks[0] = torch.argmax(to_others.min(dim=0).values)
    nearest_pick = distance[picks[0]].clone()  # [T]: distance of every row to its nearest pick
    for step in range(1, count):
        picks[step] = torch.argmax(nearest_pick)
        nearest_pick = torch.minimum(nearest_pick, distance[picks[step]])
    return picks


def dpp_greedy_map(kernel: torch.Tensor, count: int) -> torch.Tensor:
    """Greedy MAP of a determinantal point process (Chen et al., NeurIPS 2018, fast incremental Cholesky):
    `count` items of the PSD kernel [T, T], in pick order -> [count] long.

    Each step adds the item with the largest gain in log det(L_S), i.e. the largest residual variance d_j^2
    after projecting out the picks so far. When every residual is <= 1e-10 (the kernel's rank is exhausted,
    e.g. more picks than feature dimensions), the remaining picks follow the kernel diagonal, largest first.
    """
    tokens = kernel.shape[0]
    _check_count(count, tokens)
    kernel = kernel.double()  # the incremental Cholesky loses precision fast in float32
    picks = torch.empty(count, dtype=torch.long, device=kernel.device)
    factors = torch.zeros(count, tokens, dtype=kernel.dtype, device=kernel.device)  # [count, T] Cholesky rows
    residual = torch.diagonal(kernel).clone()  # [T]: d_j^2
    taken = torch.zeros(tokens, dtype=torch.bool, device=kernel.device)
    for step in range(count):
        gains = residual.masked_fill(taken, float("-inf"))
        best = int(torch.argmax(gains))
        if not gains[best] > 1e-10:
            rest = torch.diagonal(kernel).masked_fill(taken, float("-inf"))
            picks[step:] = torch.sort(rest, descending=True, stable=True).indices[: count - step]
            return picks
        picks[step] = best
        taken[best] = True
        row = (kernel[best] - factors[:step, best] @ factors[:step]) / residual[best].sqrt()  # [T]
        factors[step] = row
        residual = residual - row.square()
    return picks


def remove_duplicates(x: torch.Tensor, count: int, step: int = 8) -> torch.Tensor:
    """VisPruner's iterative duplicate removal: keep `count` rows of x [R, C] -> [count] long (positions into x,
    in the order the rule leaves them).

    Repeat until `count` remain: split the remaining rows (in their current order) into A = the even
    positions and B = the odd ones; score every A row by its highest cosine similarity to a B row; drop
    the r = min(step, remaining - count, |A|) highest-scored A rows; the new order is the other A rows by
    descending score followed by B in order.
    """
    _check_count(count, x.shape[0])
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an int >= 1, got {step!r}")
    if count == x.shape[0]:  # nothing to remove: skip the [R, R] similarities
        return torch.arange(count, device=x.device)
    unit = _unit(x)
    # every pair's cosine once [R, R]: each round then gathers its A x B block instead of multiplying it
    # again (~R / (2 step) rounds of an [R/2, C] x [C, R/2] product; 2-3x faster at R = 365-1458, C = 896)
    similarity = unit @ unit.T
    remaining = torch.arange(x.shape[0], device=x.device)
    while remaining.numel() > count:
        first, second = remaining[0::2], remaining[1::2]
        drop = min(step, remaining.numel() - count, first.numel())
        if second.numel() == 0:  # a single row left and count == 0
            return remaining[:0]
        scores = similarity[first[:, None], second[None, :]].max(dim=1).values  # [|A|]
        order = torch.sort(scores, descending=True, stable=True).indices
        remaining = torch.cat([first[order[drop:]], second])
    return remaining


def dissimilar_to_pivots(x: torch.Tensor, pivots: torch.Tensor, candidates: torch.Tensor, quotas: list[int]) -> torch.Tensor:
    """DART's duplicate-aware pick: for each pivot in turn, the `quotas[p]` candidate rows of x least similar
    (cosine) to pivot p that no earlier pivot took.

    x [T, C]; pivots [P, C]; candidates [T] bool (the rows that may be picked); quotas: P ints.
    -> [sum(quotas)] long positions into x, grouped by pivot.
    """
    if pivots.shape[0] != len(quotas):
        raise ValueError(f"one quota per pivot: got {pivots.shape[0]} pivots and {len(quotas)} quotas")
    available = candidates.clone()
    if sum(quotas) > int(available.sum()):
        raise ValueError(f"quotas sum to {sum(quotas)} but only {int(available.sum())} candidates exist")
    similarity = _unit(pivots) @ _unit(x).T  # [P, T]
    picks = []
    for pivot, quota in enumerate(quotas):
        if quota == 0:
            continue
        scores = similarity[pivot].masked_fill(~available, float("inf"))
        chosen = torch.sort(scores, stable=True).indices[:quota]
        available[chosen] = False
        picks.append(chosen)
    return torch.cat(picks) if picks else torch.empty(0, dtype=torch.long, device=x.device)

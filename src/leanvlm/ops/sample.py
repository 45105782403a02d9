"""Choosing a subset of token positions without scores: evenly spaced, or seeded at random."""

from __future__ import annotations

import torch


def evenly_spaced(available: torch.Tensor, count: int) -> torch.Tensor:
    """`count` indices spread evenly over the True positions of available [T] bool -> [count] long, ascending.

    With the R available positions p_0 < ... < p_{R-1}, picks p_j for j = floor((i + 1/2) R / count),
    i = 0..count-1: the middle of `count` equal bins (count = R picks them all; count = 1 the middle one).
    Raises ValueError if count > R or count < 0.
    """
    positions = available.nonzero().squeeze(1)
    total = positions.numel()
    if not 0 <= count <= total:
        raise ValueError(f"cannot pick {count} of {total} available positions")
    if count == 0:
        return positions[:0]
    picks = (torch.arange(count, device=available.device) * 2 + 1) * total // (2 * count)
    return positions[picks]


def seeded_subset(length: int, count: int, seed: int, device: torch.device | str | None = None) -> torch.Tensor:
    """`count` distinct positions of range(length) drawn uniformly at random -> [count] long, ascending.

    Depends only on (length, count, seed): drawn on a CPU generator seeded with `seed`, so any device,
    batch composition or global RNG state gives the same subset, and the global RNG is untouched.
    """
    if not 0 <= count <= length:
        raise ValueError(f"cannot pick {count} of {length} positions")
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(length, generator=generator)[:count]
    return torch.sort(chosen).values.to(device)

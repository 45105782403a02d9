"""Per-sample top-k selection that keeps original order, and the slot bookkeeping around it.

Samples of a batch may keep different numbers of tokens. The kept slots of every sample are packed to the
right of a common length and the free slots on the left hold the filler index -1 (the same place left
padding lives), so the last position of every row stays the sample's last real token.
"""

from __future__ import annotations

import torch

FILLER = -1


def pack_right(keep: torch.Tensor) -> torch.Tensor:
    """Indices of the True entries of each row, ascending, right-aligned, -1 on the left.

    keep [B, N] bool -> index [B, max_count] long.
    """
    batch, length = keep.shape
    counts = keep.sum(dim=1)
    width = int(counts.max()) if batch else 0
    arange = torch.arange(length, device=keep.device)
    # Kept slots sort first (ascending index), the rest after them.
    order = torch.sort(torch.where(keep, arange, arange + length), dim=1).values
    column = torch.arange(width, device=keep.device)
    first = width - counts  # [B]: first column holding a kept slot
    source = (column[None, :] - first[:, None]).clamp(min=0)
    index = torch.gather(order, 1, source.clamp(max=max(length - 1, 0))) if width else order[:, :0]
    return torch.where(column[None, :] >= first[:, None], index, torch.full_like(index, FILLER))


def top_k_mask(scores: torch.Tensor, candidates: torch.Tensor, keep_count: torch.Tensor) -> torch.Tensor:
    """Mark the keep_count[b] highest-scoring candidates of every row.

    scores [B, N] float, candidates [B, N] bool, keep_count [B] long -> [B, N] bool (True = kept
    candidate; never True outside the candidates). Ties go to the earlier position, so the choice is
    deterministic.
    """
    masked = scores.float().masked_fill(~candidates, float("-inf"))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return candidates & (rank < keep_count[:, None])


def gather_rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values [B or 1, N, *rest] at index [B, M] (entries in [0, N)) along dimension 1 -> [B, M, *rest].

    One index_select over the flattened (batch x N) rows: torch.gather with the index expanded over
    *rest reads it element by element and is ~3x slower on CPU for hidden-state-wide rows. A batch
    dimension of 1 in `values` is broadcast.
    """
    batch, width = index.shape
    rest = values.shape[2:]
    if values.shape[0] == 1:
        flat = values[0].index_select(0, index.reshape(-1))
    else:
        offsets = torch.arange(batch, device=index.device)[:, None] * values.shape[1]
        flat = values.reshape(batch * values.shape[1], *rest).index_select(0, (index + offsets).reshape(-1))
    return flat.view(batch, width, *rest)


def gather_slots(values: torch.Tensor, index: torch.Tensor, fill: float | bool | None = 0) -> torch.Tensor:
    """Gather dimension 1 by a [B, M] slot index; -1 entries become `fill` (None: leave slot 0's value).

    values [B, N, *rest] -> [B, M, *rest]. A batch dimension of 1 in `values` is broadcast.
    """
    out = gather_rows(values, index.clamp(min=0))  # a new tensor
    if fill is not None:
        out[index == FILLER] = fill  # writes the filler rows only, not a pass over all of out
    return out


def merge_slots(values: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Fold slots into target slots: a slot that some slot targets becomes the weighted sum of the slots that
    target it; every other slot is returned unchanged (bit-exact).

    values [B, N, D]; target [B, N] long (-1: contributes to nothing); weight [B, N] float -> [B, N, D], summed
    in float32 (or wider) and cast back to values' dtype.
    """
    accumulate = torch.promote_types(values.dtype, torch.float32)
    contributes = target >= 0
    index = target.clamp(min=0)
    weighted = values.to(accumulate) * torch.where(contributes, weight, 0).to(accumulate)[..., None]
    summed = torch.zeros(values.shape, dtype=accumulate, device=values.device)
    summed.scatter_add_(1, index[..., None].expand_as(values), weighted)
    touched = torch.zeros(target.shape, dtype=torch.long, device=target.device).scatter_add_(1, index, contributes.long())
    return torch.where((touched > 0)[..., None], summed.to(values.dtype), values)

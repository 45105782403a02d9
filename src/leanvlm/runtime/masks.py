"""Attention masks for layers that compute on a subset of the tokens."""

from __future__ import annotations

import torch


def reduced_attention_mask(
    base: torch.Tensor | None,
    rows_local: torch.Tensor,
    rows_orig: torch.Tensor,
    cols: torch.Tensor,
) -> torch.Tensor:
    """The model's layer-0 mask restricted to some query rows and key columns.

    base: the mask the model built for this forward, [B, 1, Q0, K0] bool (True = attend) or additive float,
    or None (plain causal, no padding). rows_local [B, R]: query rows in base's row space; rows_orig [B, R]:
    the same queries' positions in the key space (for the causal rule when base is None; -1 = filler row);
    cols [B, C]: key columns in base's column space (-1 = filler key, never attended).
    -> [B, 1, R, C] in base's representation (bool when base is None or bool; additive float of base's dtype otherwise).

    A filler query row attends only to its own slot (its column index equals its row index), so no row
    is fully masked and no NaN can reach real rows through the values.
    """
    col_valid = cols >= 0
    safe_cols = cols.clamp(min=0)
    if base is None:
        allowed = col_valid[:, None, :] & (safe_cols[:, None, :] <= rows_orig[:, :, None])
    else:
        attend = base[:, 0] if base.dtype == torch.bool else base[:, 0] > torch.finfo(base.dtype).min / 2
        attend = attend.expand(rows_local.shape[0], *attend.shape[1:])
        rows = torch.gather(attend, 1, rows_local.clamp(min=0)[:, :, None].expand(-1, -1, attend.shape[2]))
        allowed = torch.gather(rows, 2, safe_cols[:, None, :].expand(-1, rows.shape[1], -1)) & col_valid[:, None, :]
    filler_rows = rows_orig < 0
    if filler_rows.any():
        own = torch.arange(rows_orig.shape[1], device=cols.device)
        diagonal = own[:, None] == torch.arange(cols.shape[1], device=cols.device)[None, :]  # [R, C]
        allowed = torch.where(filler_rows[:, :, None], diagonal[None], allowed)
    allowed = allowed[:, None]
    if base is None or base.dtype == torch.bool:
        return allowed
    zero = torch.zeros((), dtype=base.dtype, device=base.device)
    return torch.where(allowed, zero, torch.finfo(base.dtype).min)


def decode_mask(base: torch.Tensor | None, rows_orig: torch.Tensor, cols: torch.Tensor, window: int | None) -> torch.Tensor:
    """A cached step's mask in a layer after an in-LLM drop, from positions alone: query positions rows_orig
    [B, R] attend to the key positions cols [B, C] (-1 = filler, never attended; no padding is left after a
    drop) at or before them, and, in a sliding-window layer (window W), less than W positions back.

    Used where the model's own mask `base` does not cover this layer's keys: it is sized to the cache
    layer the model measured (the first layer of the type, which may hold every token when this one holds
    only the kept ones), or to the window of the unreduced sequence. base only gives the representation:
    -> [B, 1, R, C], bool when base is None or bool, additive float of base's dtype otherwise.
    """
    distance = rows_orig[:, :, None] - cols[:, None, :]  # [B, R, C]
    allowed = (cols >= 0)[:, None, :] & (distance >= 0)
    if window is not None:
        allowed &= distance < window
    allowed = allowed[:, None]
    if base is None or base.dtype == torch.bool:
        return allowed
    zero = torch.zeros((), dtype=base.dtype, device=base.device)
    return torch.where(allowed, zero, torch.finfo(base.dtype).min)


def add_key_bias(mask: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An attention mask with a per-key additive bias: mask [B, 1, R, C] bool (True = attend) or additive float
    (as `reduced_attention_mask` / `decode_mask` return it), bias [B, C] (e.g. log of the patches each key
    stands for) -> [B, 1, R, C] additive float of `dtype` (the attention's query dtype): bias where attended,
    dtype's minimum elsewhere."""
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    return torch.where(allowed, bias[:, None, None, :].to(dtype), torch.finfo(dtype).min)

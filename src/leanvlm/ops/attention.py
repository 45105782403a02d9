"""Attention scores recomputed from queries and keys, in query chunks, in float32.

The model's own attention kernel (sdpa, flash) never materialises probabilities, so methods that rank
tokens by attention recompute the rows they need here. Masking is expressed by token positions instead of
an N x N mask so that memory stays O(chunk * N) per head:

    query i may attend key j  <=>  key_valid[j] and key_pos[j] <= query_pos[i]
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def reachable_key_positions(key_pos: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """key_pos [B, N] with invalid keys moved out of every query's reach (the dtype's largest value), so that
    query i may attend key j <=> reachable[j] <= query_pos[i]."""
    never = float("inf") if key_pos.is_floating_point() else torch.iinfo(key_pos.dtype).max
    return torch.where(key_valid, key_pos, never)


def grouped_logits(queries: torch.Tensor, keys: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """queries @ keys^T -> [B, H, c, w], unmasked.

    queries [B, H, c, d] (already scaled), keys [B, Hkv, w, d] in the same dtype; each group of H / Hkv query
    heads shares a key head. out: a buffer of at least B * H * c * w elements of that dtype to write into, so
    that a loop over chunks allocates (and page-faults) once, not once per chunk.
    """
    batch, heads, rows, dim = queries.shape
    kv_heads, width = keys.shape[1], keys.shape[2]
    if out is not None:
        out = out[: batch * heads * rows * width].view(batch * kv_heads, heads // kv_heads * rows, width)
    # One 3-D bmm per key head over the rows of all its query heads ([g * c, d] x [d, w]): no expanded copy
    # of the keys, and larger products. Query head h = kv * g + i, so [B * Hkv, g * c, w] is [B, H, c, w].
    grouped = queries.reshape(batch * kv_heads, heads // kv_heads * rows, dim)
    return torch.bmm(grouped, keys.flatten(0, 1).transpose(1, 2), out=out).view(batch, heads, rows, width)


def mask_logits_(logits: torch.Tensor, query_pos: torch.Tensor, reachable: torch.Tensor, first: int) -> None:
    """Set logits [B, H, c, w] to -inf where a query (positions [B, c]) may not attend a key (`reachable`
    [B, w]), from column `first` on: the caller knows every row may attend the columns before it."""
    blocked = reachable[:, None, first:] > query_pos[:, :, None]  # [B, c, w - first]
    # adding a 0 / -inf bias broadcast over the heads is bit-identical for finite logits and ~15x faster on
    # CPU than masked_fill_ with the broadcast bool mask
    bias = torch.zeros(blocked.shape, dtype=logits.dtype, device=logits.device).masked_fill_(blocked, float("-inf"))
    logits[..., first:].add_(bias[:, None])


def masked_logits(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    key_valid: torch.Tensor,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`grouped_logits` with -inf where a query may not attend a key -> (logits [B, H, c, w], has_key [B, c]).

    query_pos [B, c], key_pos and key_valid [B, w]. has_key marks the rows with at least one allowed key (the
    others are all -inf).
    """
    logits = grouped_logits(queries, keys, out)
    reachable = reachable_key_positions(key_pos, key_valid)
    # Column j is masked for some row iff its position exceeds the chunk's lowest query position: mask only
    # from the first such column (for causally ordered tokens without padding: the chunk's diagonal block).
    partly_masked = (reachable > query_pos.min(dim=1, keepdim=True).values).any(dim=0).nonzero()
    if len(partly_masked):
        mask_logits_(logits, query_pos, reachable, int(partly_masked[0]))
    return logits, query_pos >= reachable.min(dim=1, keepdim=True).values


def attention_probability_chunks(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    key_valid: torch.Tensor,
    scale: float,
    chunk_size: int = 512,
    key_bias: torch.Tensor | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (start, probs) for consecutive query chunks; probs is [B, H, chunk, Nk] float32.

    queries [B, H, Nq, d], keys [B, Hkv, Nk, d] (RoPE already applied), query_pos [B, Nq],
    key_pos [B, Nk], key_valid [B, Nk] bool. key_bias [B, Nk] float (or None): added to every query's logit
    of that key, as the model's attention mask adds it (proportional attention's log(size)). A query row
    with no allowed key (a padding slot) gets all zeros instead of NaN.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    keys = keys.float()
    for start in range(0, queries.shape[2], chunk_size):
        stop = min(start + chunk_size, queries.shape[2])
        q = queries[:, :, start:stop].float() * scale  # scaling [c, d] is cheaper than scaling [c, Nk]
        logits, has_key = masked_logits(q, keys, query_pos[:, start:stop], key_pos, key_valid)
        if key_bias is not None:
            logits += key_bias[:, None, None, :].float()
        probs = torch.softmax(logits, dim=-1)
        if not bool(has_key.all()):
            probs.nan_to_num_(nan=0.0)
        yield start, probs


def received_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    key_valid: torch.Tensor,
    scale: float,
    query_valid: torch.Tensor | None = None,
    chunk_size: int = 512,
    key_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention each key receives, averaged over heads and over the valid queries. -> float32 [B, Nk].

    Shapes and key_bias as in `attention_probability_chunks`; query_valid [B, Nq] bool (default: all valid).
    FastV uses one query (the last token); text-relevance methods use the question's tokens.
    """
    batch, _, num_queries, _ = queries.shape
    if query_valid is None:
        query_valid = torch.ones(batch, num_queries, dtype=torch.bool, device=queries.device)
    total = torch.zeros(batch, keys.shape[2], dtype=torch.float32, device=queries.device)
    for start, probs in attention_probability_chunks(queries, keys, query_pos, key_pos, key_valid, scale, chunk_size,
                                                     key_bias):
        weight = query_valid[:, start : start + probs.shape[2]].float()  # [B, c]
        total += torch.einsum("bhqk,bq->bk", probs, weight)
    num_valid = query_valid.sum(dim=1).clamp(min=1).float() * queries.shape[1]
    return total / num_valid[:, None]

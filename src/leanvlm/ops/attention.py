"""Attention scores recomputed from queries and keys, in query chunks, in float32.

The model's own attention kernel (sdpa, flash) never materialises probabilities, so methods that rank
tokens by attention recompute the rows they need here. Masking is expressed by token positions instead of
an N x N mask so that memory stays O(chunk * N) per head:

    query i may attend key j  <=>  key_valid[j] and key_pos[j] <= query_pos[i]
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def expand_kv_heads(keys: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Repeat grouped key/value heads. [B, Hkv, N, d] -> [B, num_heads, N, d]."""
    groups = num_heads // keys.shape[1]
    return keys if groups == 1 else keys.repeat_interleave(groups, dim=1)


def attention_probability_chunks(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    key_valid: torch.Tensor,
    scale: float,
    chunk_size: int = 512,
    trim_columns: bool = False,
    log: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (start, probs) for consecutive query chunks; probs is [B, H, chunk, Nk] in `dtype` (float32).

    log: yield log-probabilities instead (log_softmax: finite wherever the mask allows, -inf elsewhere;
    a row with no allowed key is all -inf).

    queries [B, H, Nq, d], keys [B, Hkv, Nk, d] (RoPE already applied), query_pos [B, Nq],
    key_pos [B, Nk], key_valid [B, Nk] bool. A query row with no allowed key (a padding slot) gets all
    zeros instead of NaN.

    trim_columns: yield only the first w columns, w = 1 + the last key any row of the chunk may attend
    (the columns after it are exactly 0). When queries and keys are the same causally ordered tokens, w is
    the chunk's end, so only the lower triangle of the attention matrix is computed.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    keys = expand_kv_heads(keys, queries.shape[1]).to(dtype)
    for start in range(0, queries.shape[2], chunk_size):
        stop = min(start + chunk_size, queries.shape[2])
        allowed = key_valid[:, None, :] & (key_pos[:, None, :] <= query_pos[:, start:stop, None])  # [B, c, Nk]
        if trim_columns:
            columns = allowed.any(dim=1).any(dim=0).nonzero()
            allowed = allowed[:, :, : int(columns.max()) + 1 if len(columns) else 1]
        q = queries[:, :, start:stop].to(dtype) * scale  # scaling [c, d] is cheaper than scaling [c, Nk]
        width = allowed.shape[2]
        # 3-D bmm over (batch x heads): the 4-D matmul of a transposed key slice is ~3x slower on CPU
        logits = torch.bmm(q.flatten(0, 1), keys[:, :, :width].flatten(0, 1).transpose(1, 2))
        logits = logits.view(*q.shape[:3], width)  # [B, H, c, w]
        logits.masked_fill_(~allowed[:, None], float("-inf"))
        probs = torch.log_softmax(logits, dim=-1) if log else torch.softmax(logits, dim=-1)
        if not bool(allowed.any(dim=2).all()):
            probs.nan_to_num_(nan=float("-inf") if log else 0.0, neginf=float("-inf"))
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
) -> torch.Tensor:
    """Attention each key receives, averaged over heads and over the valid queries. -> float32 [B, Nk].

    Shapes as in `attention_probability_chunks`; query_valid [B, Nq] bool (default: all valid).
    FastV uses one query (the last token); text-relevance methods use the question's tokens.
    """
    batch, _, num_queries, _ = queries.shape
    if query_valid is None:
        query_valid = torch.ones(batch, num_queries, dtype=torch.bool, device=queries.device)
    total = torch.zeros(batch, keys.shape[2], dtype=torch.float32, device=queries.device)
    for start, probs in attention_probability_chunks(queries, keys, query_pos, key_pos, key_valid, scale, chunk_size):
        weight = query_valid[:, start : start + probs.shape[2]].float()  # [B, c]
        total += torch.einsum("bhqk,bq->bk", probs, weight)
    num_valid = query_valid.sum(dim=1).clamp(min=1).float() * queries.shape[1]
    return total / num_valid[:, None]

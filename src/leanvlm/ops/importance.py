"""Token importance at an in-LLM pruning layer, recomputed from the layer's q/k (SPEC 1b).

Masking follows ops/attention.py: query i may attend key j iff key_valid[j] and key_pos[j] <= query_pos[i].

Two options:
- `pagerank_importance`: AIM's multi-modal importance, a PageRank-style propagation of the sharpened
  (tau = 0.1) attention over ALL N tokens of the sequence, heads aggregated by root mean square.
- The cheaper text option (attention from the question's tokens only, head-averaged and averaged over
  those queries) is exactly `leanvlm.ops.attention.received_attention`, called with the question rows'
  queries and positions as the queries and every token as the keys (no tau, the model's own scale).
  Its softmax runs over all allowed keys, as in the model; callers read off the visual columns. It is
  not duplicated here. Cost: one pass over the question's rows (O(N_text * N) per head) instead of
  `iterations` passes over all N rows (O(N^2) per head), or one N x N build when that fits in memory.
"""

from __future__ import annotations

import torch

from leanvlm.ops.attention import attention_probability_chunks, expand_kv_heads


def pagerank_importance(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    key_valid: torch.Tensor,
    scale: float,
    tau: float = 0.1,
    iterations: int = 5,
    chunk_size: int = 256,
    max_matrix_bytes: int = 256 * 2**20,
) -> torch.Tensor:
    """AIM's multi-modal importance of every token -> float32 [B, N].

    queries [B, H, N, d] and keys [B, Hkv, N, d] are the layer's post-RoPE projections of the SAME N
    tokens (grouped key heads are expanded); query_pos, key_pos [B, N]; key_valid [B, N] bool marks
    real tokens (False: padding). scale is the model's logit scale (usually 1 / sqrt(d)).

    Per head, M = softmax(Q K^T * scale / tau + mask) in float32 (rows = queries); p0 is uniform 1/n
    over the n valid tokens (0 on invalid slots); `iterations` times p <- p @ M (no damping). Then
    score_j = sqrt(mean_h p_hj^2). Invalid slots score exactly 0; valid tokens can also score 0 (e.g.
    a token nobody attends to), so callers must select candidates by mask, not by value.

    Memory: when the full M (B * H * N * N * 4 bytes) fits in `max_matrix_bytes` it is built once (in
    query chunks of `chunk_size` rows, each only as wide as its last attendable key: about the lower half
    for causal positions) and reused by every iteration; otherwise each iteration recomputes M chunk by
    chunk, so the peak extra memory is O(B * H * chunk_size * N) at `iterations` times the compute.
    """
    batch, num_heads, num_tokens, _ = queries.shape
    if keys.shape[0] != batch or keys.shape[2] != num_tokens or num_heads % keys.shape[1]:
        raise ValueError(
            f"queries [B, H, N, d] and keys [B, Hkv, N, d] must share B and N with H divisible by Hkv, "
            f"got {tuple(queries.shape)} and {tuple(keys.shape)}"
        )
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")

    keys = expand_kv_heads(keys, num_heads).float()  # expanded once; each build below reuses it
    valid = key_valid.float()
    p = (valid / valid.sum(dim=1, keepdim=True).clamp(min=1))[:, None, :].expand(-1, num_heads, -1)

    def build():
        # chunks only as wide as their last attendable key: about the lower half of M for causal positions
        return attention_probability_chunks(queries, keys, query_pos, key_pos, key_valid, scale / tau, chunk_size,
                                            trim_columns=True)

    def propagate(p: torch.Tensor, chunks) -> torch.Tensor:
        """p [B, H, N] -> p @ M, accumulated chunk by chunk (probs [B, H, c, w])."""
        nxt = torch.zeros(batch, num_heads, num_tokens, dtype=torch.float32, device=queries.device)
        for start, probs in chunks:
            rows = p[:, :, None, start : start + probs.shape[2]]  # [B, H, 1, c]
            nxt[:, :, : probs.shape[3]] += torch.bmm(rows.flatten(0, 1), probs.flatten(0, 1)).view(batch, num_heads, -1)
        return nxt

    if batch * num_heads * num_tokens * num_tokens * 4 <= max_matrix_bytes:
        stored = list(build())
        for _ in range(iterations):
            p = propagate(p, stored)
    else:
        for _ in range(iterations):
            p = propagate(p, build())
    return p.pow(2).mean(dim=1).sqrt()

"""Token importance at an in-LLM pruning layer, recomputed from the layer's q/k (SPEC 1b).

Masking follows ops/attention.py: query i may attend key j iff key_valid[j] and key_pos[j] <= query_pos[i].

Two options:
- `pagerank_importance`: AIM's multi-modal importance, a PageRank-style propagation of the sharpened
  (tau = 0.1) attention over ALL N tokens of the sequence, heads aggregated by root mean square.
  `pagerank_log_importance` is the same quantity propagated in the log domain: with tau = 0.1 the
  float32 probabilities underflow (on the bundled model 15% of the scores at a pruning layer are exactly
  0.0, up to 34%), and a top-k over those ties keeps whichever tokens come first. In the log domain no
  score underflows, so tokens rank as exact arithmetic would (up to float32 rounding of the logs).
  `ranking_importance` returns the fast float32 scores when they are safely above the underflow range
  and distinct, else float64 ones under the same test, and the log-domain scores only when both fail.
- The cheaper text option (attention from the question's tokens only, head-averaged and averaged over
  those queries) is exactly `leanvlm.ops.attention.received_attention`, called with the question rows'
  queries and positions as the queries and every token as the keys (no tau, the model's own scale).
  Its softmax runs over all allowed keys, as in the model; callers read off the visual columns. It is
  not duplicated here. Cost: one pass over the question's rows (O(N_text * N) per head) instead of
  `iterations` passes over all N rows (O(N^2) per head), or one N x N build when that fits in memory.
"""

from __future__ import annotations

import math

import torch

from leanvlm.ops.attention import attention_probability_chunks, expand_kv_heads


def _check_arguments(queries: torch.Tensor, keys: torch.Tensor, tau: float, iterations: int) -> None:
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


def _iterate(state: torch.Tensor, propagate, build, iterations: int, store: bool) -> torch.Tensor:
    """`iterations` times state <- propagate(state, chunks of M): the chunks are built once and reused when
    `store` (M fits in memory), else rebuilt for every iteration (peak memory O(chunk * N) per head)."""
    stored = list(build()) if store else None
    for _ in range(iterations):
        state = propagate(state, stored if store else build())
    return state


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
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """AIM's multi-modal importance of every token -> [B, N] in `dtype` (float32; float64 underflows only
    for logit gaps ~8x wider, at about twice the time).

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
    _check_arguments(queries, keys, tau, iterations)

    keys = expand_kv_heads(keys, num_heads).to(dtype)  # expanded once; each build below reuses it
    valid = key_valid.to(dtype)
    p = (valid / valid.sum(dim=1, keepdim=True).clamp(min=1))[:, None, :].expand(-1, num_heads, -1)

    def build():
        # chunks only as wide as their last attendable key: about the lower half of M for causal positions
        return attention_probability_chunks(queries, keys, query_pos, key_pos, key_valid, scale / tau, chunk_size,
                                            trim_columns=True, dtype=dtype)

    def propagate(p: torch.Tensor, chunks) -> torch.Tensor:
        """p [B, H, N] -> p @ M, accumulated chunk by chunk (probs [B, H, c, w])."""
        nxt = torch.zeros(batch, num_heads, num_tokens, dtype=dtype, device=queries.device)
        for start, probs in chunks:
            rows = p[:, :, None, start : start + probs.shape[2]]  # [B, H, 1, c]
            nxt[:, :, : probs.shape[3]] += torch.bmm(rows.flatten(0, 1), probs.flatten(0, 1)).view(batch, num_heads, -1)
        return nxt

    matrix_bytes = batch * num_heads * num_tokens * num_tokens * torch.finfo(dtype).bits // 8
    p = _iterate(p, propagate, build, iterations, matrix_bytes <= max_matrix_bytes)
    return p.pow(2).mean(dim=1).sqrt()


#: Scores below this are near float32's underflow range (2^-126 normal, 2^-149 subnormal): some of their
#: contributions may have been flushed to zero, so their ranking is not trusted.
SAFE_MIN_SCORE = 2.0**-100
SAFE_MIN_SCORE_FLOAT64 = 2.0**-1000  # the same margin below float64's 2^-1022


def pagerank_log_importance(
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
    """log of `pagerank_importance`'s score, computed without underflow -> float32 [B, N] (-inf: invalid).

    Same inputs and quantity: log M = log_softmax(logits * scale / tau) per chunk (finite wherever the mask
    allows), log p0 = -log n, then `iterations` times log p_j <- logsumexp_i(log p_i + log M_ij), and
    log score_j = (logsumexp_h(2 log p_hj) - log H) / 2. Memory as in `pagerank_importance`; about 3x
    its time (an elementwise exp per entry and iteration instead of one bmm), paid only where the float32
    scores underflow (see `ranking_importance`).
    """
    batch, num_heads, num_tokens, _ = queries.shape
    _check_arguments(queries, keys, tau, iterations)
    keys = expand_kv_heads(keys, num_heads).float()
    count = key_valid.sum(dim=1, keepdim=True).clamp(min=1).float()
    log_p = torch.where(key_valid, -count.log(), float("-inf"))[:, None, :].expand(-1, num_heads, -1).contiguous()

    def build():
        return attention_probability_chunks(queries, keys, query_pos, key_pos, key_valid, scale / tau, chunk_size,
                                            trim_columns=True, log=True)

    def propagate(log_p: torch.Tensor, chunks) -> torch.Tensor:
        """log p [B, H, N] -> log(p @ M), a logsumexp over the rows of every chunk (log M [B, H, c, w])."""
        nxt = torch.full((batch, num_heads, num_tokens), float("-inf"), dtype=torch.float32, device=queries.device)
        for start, log_m in chunks:
            terms = log_p[:, :, start : start + log_m.shape[2], None] + log_m  # [B, H, c, w]
            width = log_m.shape[3]
            nxt[:, :, :width] = torch.logaddexp(nxt[:, :, :width], torch.logsumexp(terms, dim=2))
        return nxt

    matrix_bytes = batch * num_heads * num_tokens * num_tokens * 4
    log_p = _iterate(log_p, propagate, build, iterations, matrix_bytes <= max_matrix_bytes)
    rms = (torch.logsumexp(2 * log_p, dim=1) - math.log(num_heads)) / 2
    return torch.where(key_valid, rms, float("-inf"))


def ranking_importance(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    key_valid: torch.Tensor,
    candidates: torch.Tensor,
    scale: float,
    **options,
) -> torch.Tensor:
    """PageRank importance to rank `candidates` [B, N] bool by -> float32 [B, N], higher = keep.

    The float32 `pagerank_importance` when every candidate scores >= SAFE_MIN_SCORE and no two candidates
    of a row tie; else the log of the float64 one under the same test (about 2x float32's time); else
    `pagerank_log_importance` (about 4x), which neither underflows nor ties by underflow. Either way the
    order equals the exact one up to rounding. Options: tau, iterations, chunk_size, max_matrix_bytes.
    """
    for dtype, safe_min in ((torch.float32, SAFE_MIN_SCORE), (torch.float64, SAFE_MIN_SCORE_FLOAT64)):
        scores = pagerank_importance(queries, keys, query_pos, key_pos, key_valid, scale, dtype=dtype, **options)
        if bool((candidates & (scores < safe_min)).any()):
            continue  # near underflow: some contributions may be lost
        # float64 scores are ranked in float32 as their log: finite and as distinct as the ranking needs
        ranked = scores if dtype == torch.float32 else scores.log().float()
        if not _ties(ranked, candidates):
            return ranked
    return pagerank_log_importance(queries, keys, query_pos, key_pos, key_valid, scale, **options)


def _ties(scores: torch.Tensor, candidates: torch.Tensor) -> bool:
    """Whether two candidates [B, N] of a row have equal scores [B, N]."""
    ordered = torch.where(candidates, scores, float("nan")).sort(dim=1).values  # NaNs sort last, never equal
    return bool((ordered[:, 1:] == ordered[:, :-1]).any())

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
  the PageRank's pass over all N rows (O(N^2) per head).

How the propagation is computed. When the tokens are in causal order (no real token attends a later
slot: every runtime caller, whose slots are in position order), M is lower triangular and
p_{t+1}[j] = sum_{i >= j} p_t[i] M_ij needs only the rows at or after j. So M is built ONCE, in query
chunks from the last chunk to the first, and each chunk serves every iteration before the next one is
built (`_causal_sweep`): its diagonal block [c, c] advances the chunk's own p_t one step at a time, and
the block left of it [c, start] then pushes all of p_0 .. p_{T-1} at once (one [T, c] x [c, start]
product instead of T matrix-vector ones: the block is read once, not T times). Peak extra memory is
O(B * H * chunk * N), and after chunk [start, stop) the final scores of its columns are known, so
`ranking_importance` abandons a precision as soon as one candidate there is near underflow. Positions
out of causal order fall back to iterating in order (`_iterate_in_order`): each iteration rebuilds M
chunk by chunk, or M is stored when it fits `max_matrix_bytes`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from leanvlm.ops.attention import grouped_logits, mask_logits_, masked_logits, reachable_key_positions

#: Called by the sweep after chunk [start, stop) with (start, stop, final p or log p of those columns
#: [B, H, stop - start]); True stops the sweep (the caller has seen enough).
ColumnsDone = Callable[[int, int, torch.Tensor], bool]


#: Default query rows per chunk. Fewer rows pay the per-chunk overhead more often, more rows make blocks
#: that run slower through the softmax and the products. Measured (ranking_importance, float32, 1 thread,
#: LLaVA-OneVision-0.5B's 14 query / 2 key heads, ms a call) at 32 / 64 / 128 / 256 rows: N = 381: 7.6 / 6.1 /
#: 6.2 / 6.7; N = 997: 29.1 / 25.4 / 29.5 / 37.3; N = 1669: 67.7 / 62.7 / 74.6 / 97.9.
CHUNK_ROWS = 64


def _check_arguments(queries: torch.Tensor, keys: torch.Tensor, tau: float, iterations: int, chunk_size: int) -> None:
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
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def causally_ordered(query_pos: torch.Tensor, key_pos: torch.Tensor, key_valid: torch.Tensor) -> bool:
    """Whether no real token may attend a real token in a later slot -> M is lower triangular.

    query_pos, key_pos [B, N] of the same N tokens, key_valid [B, N] bool. Rows of invalid slots may attend
    anything: their PageRank mass is 0, so they never contribute. O(N): a suffix minimum of key_pos.
    """
    reachable = reachable_key_positions(key_pos, key_valid)
    from_slot = reachable.flip(1).cummin(dim=1).values.flip(1)  # [B, N]: min reachable position over slots >= i
    return not bool((key_valid[:, :-1] & (from_slot[:, 1:] <= query_pos[:, :-1])).any())


class _Linear:
    """Propagation of p itself: a chunk's block is its rows of M, and pushing rows of p through it is a
    product added in place."""

    zero = 0.0

    @staticmethod
    def start(key_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """p0 [B, N]: uniform over the valid tokens, 0 elsewhere."""
        valid = key_valid.to(dtype)
        return valid / valid.sum(dim=1, keepdim=True).clamp(min=1)

    @staticmethod
    def block(logits: torch.Tensor, has_key: torch.Tensor) -> torch.Tensor:
        """logits [B * H, c, w] (-inf = masked) -> M's rows [B * H, c, w] (a row with no allowed key: 0).

        torch.softmax, not an in-place exp_ on the logits: on real activations (tau = 0.1: about half of
        the entries underflow) its exponential is ~4x faster than exp_'s (measured: 0.66 vs 2.6 ms on a
        [9, 168, 168] block of the bundled model), whose slow path handles underflowing inputs.
        """
        probs = torch.softmax(logits, dim=-1)
        if not bool(has_key.all()):
            probs.nan_to_num_(nan=0.0)
        return probs

    @staticmethod
    def add_pushed(target: torch.Tensor, rows: torch.Tensor, probs: torch.Tensor, lo: int, hi: int) -> None:
        """target [B * H, T, hi - lo] += rows [B * H, T, c] of p (T states) @ M[:, lo:hi], in place (one
        baddbmm_, no temporary)."""
        target.baddbmm_(rows, probs[:, :, lo:hi])


class _Log:
    """Propagation of log p: a chunk's block is log M = log_softmax(logits), and pushing rows through it
    is a logsumexp over the rows (no product underflows)."""

    zero = float("-inf")

    @staticmethod
    def start(key_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """log p0 [B, N]: -log n on the n valid tokens, -inf elsewhere."""
        count = key_valid.sum(dim=1, keepdim=True).clamp(min=1).to(dtype)
        return torch.where(key_valid, -count.log(), float("-inf"))

    @staticmethod
    def block(logits: torch.Tensor, has_key: torch.Tensor) -> torch.Tensor:
        """logits [B * H, c, w] (-inf = masked) -> log M [B * H, c, w] (-inf where masked; a row with no
        allowed key: all -inf)."""
        log_m = torch.log_softmax(logits, dim=-1)
        if not bool(has_key.all()):
            log_m.nan_to_num_(nan=float("-inf"), neginf=float("-inf"))
        return log_m

    @staticmethod
    def push(rows: torch.Tensor, log_m: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """rows [B * H, T, c] of log p -> log(p @ M[:, lo:hi]) [B * H, T, hi - lo]; one state at a time, so
        the [c, hi - lo] terms are the only temporary."""
        columns = log_m[:, :, lo:hi]
        steps = range(rows.shape[1])
        return torch.stack([torch.logsumexp(rows[:, t, :, None] + columns, dim=1) for t in steps], dim=1)

    @staticmethod
    def add_pushed(target: torch.Tensor, rows: torch.Tensor, log_m: torch.Tensor, lo: int, hi: int) -> None:
        """log-domain target [B * H, T, hi - lo] <- logaddexp(target, log(p @ M[:, lo:hi])), in place."""
        target.copy_(torch.logaddexp(target, _Log.push(rows, log_m, lo, hi)))


Propagation = type[_Linear] | type[_Log]


def _propagate(
    propagation: Propagation,
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    key_valid: torch.Tensor,
    scale: float,
    tau: float = 0.1,
    iterations: int = 5,
    chunk_size: int = CHUNK_ROWS,
    max_matrix_bytes: int = 256 * 2**20,
    dtype: torch.dtype = torch.float32,
    columns_done: ColumnsDone | None = None,
) -> torch.Tensor | None:
    """p_T (linear) or log p_T (log) [B, H, N] after `iterations` steps; None when `columns_done` stopped it
    (the sweep asks it after every chunk, otherwise it is asked once about all columns).

    Arguments as in `pagerank_importance`; M = softmax(queries keys^T * scale / tau + mask) in `dtype`.
    """
    _check_arguments(queries, keys, tau, iterations, chunk_size)
    batch, num_heads, num_tokens, _ = queries.shape
    keys = keys.to(dtype)
    # states[b * H + h, t] = p_t of head h: (batch x heads) flattened once, as every product is a 3-D bmm
    states = torch.full((batch * num_heads, iterations + 1, num_tokens), propagation.zero, dtype=dtype,
                        device=queries.device)
    states.view(batch, num_heads, -1, num_tokens)[:, :, 0] = propagation.start(key_valid, dtype)[:, None, :]

    def heads(values: torch.Tensor) -> torch.Tensor:
        """[B * H, ...] -> [B, H, ...]"""
        return values.view(batch, num_heads, *values.shape[1:])

    if iterations and causally_ordered(query_pos, key_pos, key_valid):
        record_grad = torch.is_grad_enabled() and (queries.requires_grad or keys.requires_grad)
        done = None if columns_done is None else lambda lo, hi, p: columns_done(lo, hi, heads(p))
        final = _causal_sweep(propagation, states, queries, keys, scale / tau, query_pos,
                              reachable_key_positions(key_pos, key_valid), chunk_size, done, record_grad)
        return None if final is None else heads(final)
    if iterations:
        matrix_bytes = batch * num_heads * num_tokens * num_tokens * torch.finfo(dtype).bits // 8
        _iterate_in_order(propagation, states, queries, keys, scale / tau, query_pos, key_pos, key_valid, chunk_size,
                          store=matrix_bytes <= max_matrix_bytes)
    final = heads(states[:, -1])
    return None if columns_done is not None and columns_done(0, num_tokens, final) else final


def _first_masked_columns(query_pos: torch.Tensor, reachable: torch.Tensor, chunk_size: int) -> list[int]:
    """For every query chunk, the first key column some row of it may not attend (N: none), all chunks at once.

    query_pos [B, N], reachable [B, N] (`reachable_key_positions`). Column j is masked for some row of a chunk
    iff reachable[j] exceeds the chunk's lowest query position.
    """
    batch, num_tokens = query_pos.shape
    chunks = -(-num_tokens // chunk_size)
    padded = torch.full((batch, chunks * chunk_size), torch.iinfo(torch.long).max, dtype=torch.long,
                        device=query_pos.device)
    padded[:, :num_tokens] = query_pos
    lowest = padded.view(batch, chunks, chunk_size).amin(dim=2)  # [B, chunks]
    partly_masked = (reachable[:, None, :] > lowest[:, :, None]).any(dim=0)  # [chunks, N]
    first = torch.where(partly_masked.any(dim=1), partly_masked.int().argmax(dim=1), num_tokens)
    return first.tolist()


def _causal_sweep(
    propagation: Propagation,
    states: torch.Tensor,
    queries: torch.Tensor,
    keys: torch.Tensor,
    logit_scale: float,
    query_pos: torch.Tensor,
    reachable: torch.Tensor,
    chunk_size: int,
    columns_done: Callable[[int, int, torch.Tensor], bool] | None,
    record_grad: bool,
) -> torch.Tensor | None:
    """All iterations at once over a lower-triangular M (see the module docstring), chunks last to first.

    states [B * H, T + 1, N]: p_0 set, the rest zero (log: -inf); filled in place. queries [B, H, N, d], keys
    [B, Hkv, N, d] in the states' dtype, logits = queries keys^T * logit_scale; query_pos [B, N], reachable
    [B, N] (`reachable_key_positions`). Chunk
    [start, stop) only attends keys < stop (causal order), so its block is [c, stop]: columns [start, stop)
    its diagonal block, [0, start) the part left of it. When the chunk is reached, every row after it has
    pushed all of its states, so p_t of the chunk's rows is complete up to the chunk's own contribution of step
    t - 1. columns_done gets the final states [B * H, stop - start] of each finished chunk. -> p_T [B * H, N].
    """
    rows, steps, num_tokens = states.shape
    iterations = steps - 1
    # one logits buffer for every chunk: at most chunk_size rows by at most N columns (autograd cannot
    # record a product written into a buffer: then every chunk allocates its own)
    buffer = None if record_grad else torch.empty(rows * min(chunk_size, num_tokens) * num_tokens, dtype=states.dtype,
                                                  device=states.device)
    # the per-chunk mask bookkeeping, computed once: where masking starts, and the lowest key position in
    # reach of each prefix of the keys (a row with a smaller position has no key: it stays all zero)
    first_masked = _first_masked_columns(query_pos, reachable, chunk_size)
    lowest_reachable = reachable.cummin(dim=1).values  # [B, N]
    last_start = (num_tokens - 1) // chunk_size * chunk_size
    for start in range(last_start, -1, -chunk_size):
        stop = min(start + chunk_size, num_tokens)
        scaled = queries[:, :, start:stop].to(states.dtype) * logit_scale  # cheaper than scaling [c, stop]
        logits = grouped_logits(scaled, keys[:, :, :stop], buffer)  # [B, H, c, stop]
        if first_masked[start // chunk_size] < stop:
            mask_logits_(logits, query_pos[:, start:stop], reachable[:, :stop], first_masked[start // chunk_size])
        has_key = query_pos[:, start:stop] >= lowest_reachable[:, stop - 1 : stop]  # [B, c]
        block = propagation.block(logits.flatten(0, 1), has_key)
        for t in range(iterations):  # diagonal block: step t's result is read by step t + 1
            propagation.add_pushed(states[:, t + 1 : t + 2, start:stop], states[:, t : t + 1, start:stop], block,
                                   start, stop)
        if start:  # left of the diagonal: every state of these rows in one product
            propagation.add_pushed(states[:, 1:, :start], states[:, :-1, start:stop], block, 0, start)
        del block  # before the next chunk's block exists: peak memory two blocks (logits buffer + block), not three
        if columns_done is not None and columns_done(start, stop, states[:, -1, start:stop]):
            return None
    return states[:, -1]


def _iterate_in_order(
    propagation: Propagation,
    states: torch.Tensor,
    queries: torch.Tensor,
    keys: torch.Tensor,
    logit_scale: float,
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    key_valid: torch.Tensor,
    chunk_size: int,
    store: bool,
) -> None:
    """Any M: iteration after iteration, chunks in order; blocks built once and kept when `store`, else
    rebuilt every iteration (peak O(B * H * chunk * N)). Each chunk's block is only as wide as its last
    attendable key. Arguments as in `_causal_sweep`; states filled in place."""
    num_tokens = states.shape[-1]
    reachable = reachable_key_positions(key_pos, key_valid)

    def blocks():
        for start in range(0, num_tokens, chunk_size):
            stop = min(start + chunk_size, num_tokens)
            attendable = (reachable[:, None, :] <= query_pos[:, start:stop, None]).any(dim=1).any(dim=0).nonzero()
            width = int(attendable.max()) + 1 if len(attendable) else 1
            scaled = queries[:, :, start:stop].to(states.dtype) * logit_scale
            logits, has_key = masked_logits(scaled, keys[:, :, :width], query_pos[:, start:stop], key_pos[:, :width],
                                            key_valid[:, :width])
            yield start, stop, width, propagation.block(logits.flatten(0, 1), has_key)

    stored = list(blocks()) if store else None
    for t in range(states.shape[1] - 1):
        for start, stop, width, block in stored if store else blocks():
            propagation.add_pushed(states[:, t + 1 : t + 2, :width], states[:, t : t + 1, start:stop], block, 0, width)


def _root_mean_square_over_heads(p: torch.Tensor) -> torch.Tensor:
    """p [B, H, N] -> sqrt(mean_h p^2) [B, N]."""
    return p.pow(2).mean(dim=1).sqrt()


def _log_root_mean_square_over_heads(log_p: torch.Tensor) -> torch.Tensor:
    """log p [B, H, N] -> log sqrt(mean_h p^2) [B, N], without leaving the log domain."""
    return (torch.logsumexp(2 * log_p, dim=1) - math.log(log_p.shape[1])) / 2


def pagerank_importance(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    key_valid: torch.Tensor,
    scale: float,
    tau: float = 0.1,
    iterations: int = 5,
    chunk_size: int = CHUNK_ROWS,
    max_matrix_bytes: int = 256 * 2**20,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """AIM's multi-modal importance of every token -> [B, N] in `dtype` (float32; float64 underflows only
    for logit gaps ~8x wider, at about twice the time).

    queries [B, H, N, d] and keys [B, Hkv, N, d] are the layer's post-RoPE projections of the SAME N
    tokens (each group of H / Hkv query heads shares a key head); query_pos, key_pos [B, N]; key_valid [B, N] bool marks
    real tokens (False: padding). scale is the model's logit scale (usually 1 / sqrt(d)).

    Per head, M = softmax(Q K^T * scale / tau + mask) (rows = queries); p0 is uniform 1/n over the n valid
    tokens (0 on invalid slots); `iterations` times p <- p @ M (no damping). Then score_j =
    sqrt(mean_h p_hj^2). Invalid slots score exactly 0; valid tokens can also score 0 (e.g. a token nobody
    attends to), so callers must select candidates by mask, not by value.

    Memory: causally ordered tokens (see the module docstring) build M once in query chunks of
    `chunk_size` rows, peak extra memory O(B * H * chunk_size * N) (two blocks).
    Otherwise M (B * H * N * N * itemsize bytes) is stored when it fits `max_matrix_bytes`, else rebuilt
    chunk by chunk for every iteration.
    """
    p = _propagate(_Linear, queries, keys, query_pos, key_pos, key_valid, scale, tau, iterations, chunk_size,
                   max_matrix_bytes, dtype)
    return _root_mean_square_over_heads(p)


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
    chunk_size: int = CHUNK_ROWS,
    max_matrix_bytes: int = 256 * 2**20,
) -> torch.Tensor:
    """log of `pagerank_importance`'s score, computed without underflow -> float32 [B, N] (-inf: invalid).

    Same inputs and quantity: log M = log_softmax(logits * scale / tau) per chunk (finite wherever the mask
    allows), log p0 = -log n, then `iterations` times log p_j <- logsumexp_i(log p_i + log M_ij), and
    log score_j = (logsumexp_h(2 log p_hj) - log H) / 2. Memory as in `pagerank_importance`; several times
    its time (an elementwise exp per entry and iteration instead of one product), paid only where the
    float32 and float64 scores underflow (see `ranking_importance`).
    """
    log_p = _propagate(_Log, queries, keys, query_pos, key_pos, key_valid, scale, tau, iterations, chunk_size,
                       max_matrix_bytes, torch.float32)
    return torch.where(key_valid, _log_root_mean_square_over_heads(log_p), float("-inf"))


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
    `pagerank_log_importance`, which neither underflows nor ties by underflow. Either way the order equals
    the exact one up to rounding. A precision is abandoned as soon as one candidate's final score is below
    its safe minimum (the causal sweep knows the final scores chunk by chunk), so a failing attempt costs
    only part of a full one. Options: tau, iterations, chunk_size, max_matrix_bytes.
    """
    for dtype, safe_min in ((torch.float32, SAFE_MIN_SCORE), (torch.float64, SAFE_MIN_SCORE_FLOAT64)):

        def near_underflow(start: int, stop: int, p: torch.Tensor, safe_min: float = safe_min) -> bool:
            return bool((candidates[:, start:stop] & (_root_mean_square_over_heads(p) < safe_min)).any())

        p = _propagate(_Linear, queries, keys, query_pos, key_pos, key_valid, scale, dtype=dtype,
                       columns_done=near_underflow, **options)
        if p is None:
            continue  # near underflow: some contributions may be lost
        scores = _root_mean_square_over_heads(p)
        # float64 scores are ranked in float32 as their log: finite and as distinct as the ranking needs
        ranked = scores if dtype == torch.float32 else scores.log().float()
        if not _ties(ranked, candidates):
            return ranked
    return pagerank_log_importance(queries, keys, query_pos, key_pos, key_valid, scale, **options)


def _ties(scores: torch.Tensor, candidates: torch.Tensor) -> bool:
    """Whether two candidates [B, N] of a row have equal scores [B, N]."""
    ordered = torch.where(candidates, scores, float("nan")).sort(dim=1).values  # NaNs sort last, never equal
    return bool((ordered[:, 1:] == ordered[:, :-1]).any())

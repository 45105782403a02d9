import itertools
import math

import pytest
import torch

import leanvlm.ops.importance as importance
from leanvlm.ops.attention import received_attention
from leanvlm.ops.importance import pagerank_importance, ranking_importance
from leanvlm.ops.select import top_k_mask

BATCH, HEADS, KV_HEADS, TOKENS, DIM, PAD = 2, 4, 2, 13, 8, 3
SCALE = 1 / math.sqrt(DIM)


def dense_attention(queries, keys, query_pos, key_pos, key_valid, logit_scale):
    """Eager float64 softmax(Q K^T * logit_scale + mask) with the position mask; fully masked rows -> 0."""
    keys = keys.repeat_interleave(queries.shape[1] // keys.shape[1], dim=1)
    logits = queries.double() @ keys.double().transpose(-1, -2) * logit_scale
    allowed = key_valid[:, None, None, :] & (key_pos[:, None, None, :] <= query_pos[:, None, :, None])
    return torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)


def dense_pagerank(queries, keys, query_pos, key_pos, key_valid, scale, tau=0.1, iterations=5):
    matrix = dense_attention(queries, keys, query_pos, key_pos, key_valid, scale / tau)
    valid = key_valid.double()
    p = (valid / valid.sum(1, keepdim=True))[:, None, :].expand(-1, queries.shape[1], -1)
    for _ in range(iterations):
        p = torch.einsum("bhi,bhij->bhj", p, matrix)
    return p.pow(2).mean(1).sqrt()


def dense_log_pagerank(queries, keys, pos, valid, scale, tau=0.1, iterations=5):
    """log of dense_pagerank's score, propagated in the float64 log domain (nothing underflows)."""
    keys = keys.repeat_interleave(queries.shape[1] // keys.shape[1], dim=1)
    logits = queries.double() @ keys.double().transpose(-1, -2) * scale / tau
    allowed = valid[:, None, None, :] & (pos[:, None, None, :] <= pos[:, None, :, None])
    log_m = torch.log_softmax(logits.masked_fill(~allowed, float("-inf")), -1).nan_to_num(nan=float("-inf"))
    count = valid.sum(1, keepdim=True).double()
    log_p = torch.where(valid, -count.log(), float("-inf"))[:, None, :].expand(-1, queries.shape[1], -1)
    for _ in range(iterations):
        log_p = torch.logsumexp(log_p[..., :, None] + log_m, dim=-2)
    return torch.where(valid, (torch.logsumexp(2 * log_p, dim=1) - math.log(queries.shape[1])) / 2, float("-inf"))


def make_inputs(seed: int = 0, shuffled: bool = False):
    """Row 0: TOKENS real tokens; row 1: PAD left-padding slots, then TOKENS - PAD real tokens.

    shuffled: row 0's positions are a permutation, so tokens attend later slots (not causally ordered)."""
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randn(BATCH, HEADS, TOKENS, DIM, generator=gen)
    keys = torch.randn(BATCH, KV_HEADS, TOKENS, DIM, generator=gen)
    valid = torch.ones(BATCH, TOKENS, dtype=torch.bool)
    valid[1, :PAD] = False
    pos = torch.stack([torch.arange(TOKENS), (torch.arange(TOKENS) - PAD).clamp(min=0)])
    if shuffled:
        pos[0] = torch.randperm(TOKENS, generator=gen)
    return queries, keys, pos, valid


@pytest.fixture
def chunk_builds(monkeypatch):
    """Count the chunks of the attention matrix that are (re)computed."""
    calls = []

    def counting(original):
        def count(*args, **kwargs):
            calls.append(args[0].dtype)  # the dtype the chunk is computed in
            return original(*args, **kwargs)

        return count

    # the causal sweep builds a chunk with grouped_logits, the in-order path with masked_logits
    for name in ("grouped_logits", "masked_logits"):
        monkeypatch.setattr(importance, name, counting(getattr(importance, name)))
    return calls


@pytest.mark.parametrize("chunk_size", [1, 4, 13, 64])
@pytest.mark.parametrize(("shuffled", "max_matrix_bytes", "builds_per_chunk"),
                         [(False, 0, 1), (False, 2**30, 1), (True, 0, 5), (True, 2**30, 1)],
                         ids=["causal", "causal-materialisable", "shuffled-chunked", "shuffled-materialised"])
def test_matches_dense_reference(chunk_size, shuffled, max_matrix_bytes, builds_per_chunk, chunk_builds):
    queries, keys, pos, valid = make_inputs(shuffled=shuffled)
    assert importance.causally_ordered(pos, pos, valid) is not shuffled
    got = pagerank_importance(
        queries, keys, pos, pos, valid, SCALE, chunk_size=chunk_size, max_matrix_bytes=max_matrix_bytes
    )
    assert got.dtype == torch.float32 and got.shape == (BATCH, TOKENS)
    # causally ordered tokens build every chunk once, whatever the memory limit (the sweep never stores
    # M); otherwise M is stored when it fits, else rebuilt for each of the 5 iterations
    assert len(chunk_builds) == math.ceil(TOKENS / chunk_size) * builds_per_chunk
    expected = dense_pagerank(queries, keys, pos, pos, valid, SCALE)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_runtime_slots_with_fillers_and_holes_match_the_dense_reference(chunk_size):
    """The runtime's layout after a drop: filler slots (position -1, invalid) on the left of the shorter row,
    real tokens at their original positions with holes where tokens were dropped."""
    gen = torch.Generator().manual_seed(7)
    queries, keys = torch.randn(2, 4, 9, 8, generator=gen), torch.randn(2, 2, 9, 8, generator=gen)
    pos = torch.tensor([[0, 1, 4, 5, 6, 9, 10, 14, 15], [-1, -1, -1, 0, 2, 3, 7, 8, 12]])
    valid = pos >= 0
    assert importance.causally_ordered(pos, pos, valid)
    got = pagerank_importance(queries, keys, pos, pos, valid, SCALE, chunk_size=chunk_size)
    expected = dense_pagerank(queries, keys, pos, pos, valid, SCALE)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-7)
    assert torch.equal(got[1, :3], torch.zeros(3))


def test_materialises_exactly_when_the_matrix_fits(chunk_builds):
    queries, keys, pos, valid = make_inputs(shuffled=True)
    size = BATCH * HEADS * TOKENS * TOKENS * 4
    chunks = math.ceil(TOKENS / 4)
    pagerank_importance(queries, keys, pos, pos, valid, SCALE, chunk_size=4, max_matrix_bytes=size)
    pagerank_importance(queries, keys, pos, pos, valid, SCALE, chunk_size=4, max_matrix_bytes=size - 1)
    assert len(chunk_builds) == chunks + 5 * chunks


def test_causal_order_is_detected_from_positions():
    pos = torch.arange(6)[None]
    valid = torch.ones(1, 6, dtype=torch.bool)
    assert importance.causally_ordered(pos, pos, valid)
    # the runtime's layout: filler slots (position -1, invalid) on the left, real tokens in position order
    # with holes where tokens were dropped
    fillers = torch.tensor([[-1, -1, 0, 3, 4, 9]])
    assert importance.causally_ordered(fillers, fillers, fillers >= 0)
    # an invalid slot may "attend" later tokens (its mass is 0); a real one may not
    padded = torch.tensor([[0, 0, 0, 1, 2, 3]])
    assert importance.causally_ordered(padded, padded, torch.tensor([[False, False, True, True, True, True]]))
    assert not importance.causally_ordered(padded, padded, valid)  # slot 0 attends the equal position of slot 1
    swapped = torch.tensor([[0, 2, 1, 3, 4, 5]])
    assert not importance.causally_ordered(swapped, swapped, valid)


def iteration_major_pagerank(queries, keys, pos, valid, scale, tau=0.1, iterations=5, chunk_size=256,
                             dtype=torch.float32):
    """The previous implementation's arithmetic (before the causal sweep): every iteration pushes p through
    the softmax rows of every query chunk in order, chunks as wide as their last attendable key."""
    heads, tokens = queries.shape[1], queries.shape[2]
    keys = keys.repeat_interleave(heads // keys.shape[1], dim=1).to(dtype)
    weights = valid.to(dtype)
    p = (weights / weights.sum(1, keepdim=True).clamp(min=1))[:, None, :].expand(-1, heads, -1)
    for _ in range(iterations):
        nxt = torch.zeros(p.shape, dtype=dtype)
        for start in range(0, tokens, chunk_size):
            stop = min(start + chunk_size, tokens)
            allowed = valid[:, None, :] & (pos[:, None, :] <= pos[:, start:stop, None])
            width = int(allowed.any(1).any(0).nonzero().max()) + 1
            logits = (queries[:, :, start:stop].to(dtype) * (scale / tau)) @ keys[:, :, :width].transpose(-1, -2)
            probs = torch.softmax(logits.masked_fill(~allowed[:, None, :, :width], float("-inf")), -1).nan_to_num(0.0)
            nxt[:, :, :width] += (p[:, :, None, start:stop] @ probs)[:, :, 0]
        p = nxt
    return p.pow(2).mean(1).sqrt()


def top_k(scores, candidates, count):
    return top_k_mask(scores, candidates, torch.full((scores.shape[0],), count))


@pytest.mark.parametrize(("batch", "heads", "kv_heads", "tokens", "dim", "magnitude", "pad", "chunk_size"), [
    (1, 4, 2, 37, 8, 1.0, 0, 5),
    (2, 4, 2, 50, 8, 1.0, 5, 7),
    (2, 6, 3, 130, 16, 1.0, 7, 64),
    (1, 14, 2, 300, 64, 0.5, 0, 64),  # the LLaVA-OneVision-0.5B head layout
    (2, 4, 4, 61, 8, 3.5, 4, 16),  # sharp: float32 scores underflow to exact zeros, which tie
])
def test_sweep_selects_what_the_iteration_major_path_selects(batch, heads, kv_heads, tokens, dim, magnitude, pad,
                                                            chunk_size):
    """The causal sweep reorders the old path's sums (and builds each chunk once): same scores up to float32
    rounding, the same exact zeros, and the same top-k at every budget."""
    gen = torch.Generator().manual_seed(tokens)
    queries = torch.randn(batch, heads, tokens, dim, generator=gen) * magnitude
    keys = torch.randn(batch, kv_heads, tokens, dim, generator=gen) * magnitude
    valid = torch.ones(batch, tokens, dtype=torch.bool)
    valid[-1, :pad] = False
    pos = torch.stack([(torch.arange(tokens) - (pad if b == batch - 1 else 0)).clamp(min=0) for b in range(batch)])
    scale = dim**-0.5
    old = iteration_major_pagerank(queries, keys, pos, valid, scale)
    new = pagerank_importance(queries, keys, pos, pos, valid, scale, chunk_size=chunk_size)
    torch.testing.assert_close(new, old, rtol=1e-4, atol=1e-30)
    assert torch.equal(new == 0, old == 0)
    if magnitude > 1:
        assert bool((old[valid] == 0).any()), "no underflow: the case would test no ties"
    for count in range(1, tokens, max(1, tokens // 9)):
        assert torch.equal(top_k(new, valid, count), top_k(old, valid, count))
    if magnitude > 1:  # the ranking resolves those ties as exact arithmetic does, up to float32 rounding
        exact = dense_log_pagerank(queries, keys, pos, valid, scale)
        ranked = ranking_importance(queries, keys, pos, pos, valid, valid, scale, chunk_size=chunk_size)
        for row in range(batch):
            ours, truth = ranked[row, valid[row]].double(), exact[row, valid[row]]
            differ = (truth[:, None] - truth[None, :]).abs() > 1e-5 * truth.abs().max()
            assert torch.equal((ours[:, None] > ours[None, :])[differ], (truth[:, None] > truth[None, :])[differ])


@pytest.mark.parametrize("tau", [1.0, 0.1, 0.02])
@pytest.mark.parametrize("iterations", [0, 1, 5])
def test_tau_and_iterations_follow_the_definition(tau, iterations):
    queries, keys, pos, valid = make_inputs(seed=1)
    got = pagerank_importance(queries, keys, pos, pos, valid, SCALE, tau=tau, iterations=iterations, chunk_size=5)
    expected = dense_pagerank(queries, keys, pos, pos, valid, SCALE, tau, iterations)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_invalid_slots_score_zero_and_padding_does_not_change_real_tokens(chunk_size):
    queries, keys, pos, valid = make_inputs()
    scores = pagerank_importance(queries, keys, pos, pos, valid, SCALE, chunk_size=chunk_size)
    assert torch.equal(scores[1, :PAD], torch.zeros(PAD))
    alone = pagerank_importance(
        queries[1:, :, PAD:], keys[1:, :, PAD:], pos[1:, PAD:], pos[1:, PAD:], valid[1:, PAD:], SCALE,
        chunk_size=chunk_size,
    )
    torch.testing.assert_close(scores[1, PAD:], alone[0], rtol=1e-5, atol=1e-8)


def test_single_head_scores_are_a_distribution():
    # one head: score = p, and p @ M keeps its total mass (every valid row of M sums to 1)
    queries, keys, pos, valid = make_inputs(seed=2)
    scores = pagerank_importance(queries[:, :1], keys[:, :1], pos, pos, valid, SCALE)
    torch.testing.assert_close(scores.sum(1), torch.ones(BATCH))


@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_constant_and_empty_inputs_give_no_nan(chunk_size):
    queries, keys = torch.zeros(2, 2, 6, 4), torch.ones(2, 1, 6, 4)
    pos = torch.arange(6).expand(2, -1)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1] = False  # a row without any real token
    scores = pagerank_importance(queries, keys, pos, pos, valid, 0.5, chunk_size=chunk_size)
    assert not scores.isnan().any()
    assert torch.equal(scores[1], torch.zeros(6))
    # uniform causal attention sends mass towards the start: token 0 is the most important
    assert scores[0].argmax() == 0 and (scores[0].diff() <= 0).all()


def test_low_precision_inputs_are_scored_in_float32():
    queries, keys, pos, valid = make_inputs(seed=3)
    half = pagerank_importance(queries.bfloat16(), keys.bfloat16(), pos, pos, valid, SCALE)
    expected = dense_pagerank(queries.bfloat16(), keys.bfloat16(), pos, pos, valid, SCALE)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half.double(), expected, rtol=1e-4, atol=1e-7)


def test_bad_arguments_raise():
    queries, keys, pos, valid = make_inputs()
    with pytest.raises(ValueError, match="divisible"):
        pagerank_importance(queries, keys[:, :, :5], pos, pos, valid, SCALE)
    with pytest.raises(ValueError, match="tau must be > 0, got 0"):
        pagerank_importance(queries, keys, pos, pos, valid, SCALE, tau=0)


def test_text_option_is_received_attention_from_the_question_rows():
    """The cheap option (see ops/importance.py) is received_attention with the question's queries."""
    queries, keys, pos, valid = make_inputs(seed=4)
    question = slice(TOKENS - 4, TOKENS)  # the last 4 tokens play the question
    got = received_attention(queries[:, :, question], keys, pos[:, question], pos, valid, SCALE, chunk_size=3)
    probs = dense_attention(queries[:, :, question], keys, pos[:, question], pos, valid, SCALE)
    torch.testing.assert_close(got.double(), probs.mean(dim=(1, 2)), rtol=1e-4, atol=1e-7)


# --- underflow-free ranking (SPEC 1b numerics) -----------------------------------------------------------
from leanvlm.ops.importance import SAFE_MIN_SCORE, pagerank_log_importance  # noqa: E402


def sharp_inputs(seed: int = 2, magnitude: float = 3.5, shuffled: bool = False):
    """Queries/keys so large that tau = 0.1 sharpened float32 probabilities underflow to exactly 0, while
    float64 (exp down to e^-745) still represents every entry."""
    queries, keys, pos, valid = make_inputs(seed, shuffled)
    return queries * magnitude, keys * magnitude, pos, valid


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
@pytest.mark.parametrize(("shuffled", "max_matrix_bytes"), [(False, 0), (True, 0), (True, 2**30)],
                         ids=["causal", "shuffled-chunked", "shuffled-materialised"])
def test_log_importance_is_the_log_of_the_float64_reference(chunk_size, shuffled, max_matrix_bytes):
    queries, keys, pos, valid = sharp_inputs(shuffled=shuffled)
    reference = dense_pagerank(queries, keys, pos, pos, valid, SCALE)
    got = pagerank_log_importance(queries, keys, pos, pos, valid, SCALE, chunk_size=chunk_size,
                                  max_matrix_bytes=max_matrix_bytes)
    assert bool((reference[valid] > 0).all()), "float64 reference underflowed: the inputs are too sharp"
    torch.testing.assert_close(got[valid].double(), reference[valid].log(), atol=1e-3, rtol=1e-4)
    assert bool((got[~valid] == float("-inf")).all())


def test_float32_scores_underflow_and_tie_where_the_log_domain_ranks_exactly():
    queries, keys, pos, valid = sharp_inputs()
    fast = pagerank_importance(queries, keys, pos, pos, valid, SCALE)
    assert bool((fast[valid] == 0).any()), "no underflow: the test would prove nothing"
    reference = dense_pagerank(queries, keys, pos, pos, valid, SCALE)
    ranked = ranking_importance(queries, keys, pos, pos, valid, valid, SCALE)
    for row in range(BATCH):
        real = valid[row]
        ours, exact = ranked[row, real].double(), reference[row, real].log()
        # every pair the exact scores order (beyond rounding) is ordered the same way: no tie by underflow
        differ = (exact[:, None] - exact[None, :]).abs() > 1e-6
        assert differ.any()
        assert torch.equal((ours[:, None] > ours[None, :])[differ], (exact[:, None] > exact[None, :])[differ])


def test_ranking_uses_the_fast_scores_when_they_are_safe():
    queries, keys, pos, valid = make_inputs()  # unsharpened (tau = 1): no score near underflow
    fast = pagerank_importance(queries, keys, pos, pos, valid, SCALE, tau=1.0)
    assert bool((fast[valid] >= SAFE_MIN_SCORE).all())
    ranked = ranking_importance(queries, keys, pos, pos, valid, valid, SCALE, tau=1.0)
    assert torch.equal(ranked, fast)


def test_ranking_falls_back_to_the_log_domain_where_float64_underflows_too():
    queries, keys, pos, valid = sharp_inputs(seed=0, magnitude=6.0)
    wide = pagerank_importance(queries, keys, pos, pos, valid, SCALE, dtype=torch.float64)
    assert bool((wide[valid] == 0).any()), "float64 did not underflow: the test would prove nothing"
    ranked = ranking_importance(queries, keys, pos, pos, valid, valid, SCALE)
    exact = pagerank_log_importance(queries, keys, pos, pos, valid, SCALE)
    torch.testing.assert_close(ranked, exact)
    assert bool(torch.isfinite(ranked[valid]).all())


def test_ranking_gives_up_on_float32_at_the_first_chunk_near_underflow(chunk_builds):
    """The sweep finishes columns from the last chunk to the first: float32 is abandoned at the first chunk
    with a candidate near underflow, and the ranking goes on as if float32 had been finished (here float64
    ties exactly: two tokens score 1/13, so the log domain decides)."""
    queries, keys, pos, valid = sharp_inputs()
    fast = pagerank_importance(queries, keys, pos, pos, valid, SCALE, chunk_size=1)
    last_unsafe = int((valid & (fast < SAFE_MIN_SCORE)).nonzero()[:, 1].max())
    chunk_builds.clear()
    ranked = ranking_importance(queries, keys, pos, pos, valid, valid, SCALE, chunk_size=1)
    # float32 built chunks TOKENS - 1 down to last_unsafe only, float64 all of them, then the (float32) log domain
    attempts = [(dtype, len(list(run))) for dtype, run in itertools.groupby(chunk_builds)]
    assert attempts == [(torch.float32, TOKENS - last_unsafe), (torch.float64, TOKENS), (torch.float32, TOKENS)]
    assert TOKENS - last_unsafe < TOKENS
    torch.testing.assert_close(ranked, pagerank_log_importance(queries, keys, pos, pos, valid, SCALE, chunk_size=1))


def peak_extra_bytes(run) -> int:
    """Peak CPU memory that torch allocates while `run()` runs, above what was allocated before it (from the
    profiler's memory events: each carries the running total of allocated bytes)."""
    import json
    import os
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as handle:
            events = [e["args"] for e in json.load(handle)["traceEvents"] if e.get("name") == "[memory]"]
    assert events, "the profiler recorded no memory events: this test cannot measure anything"
    before = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - before


def test_peak_memory_is_a_few_chunks_not_the_matrix():
    """At AIM's first pruning layer of the 32-frame LLaVA-OneVision-0.5B workload (1669 tokens, 14 query and 2
    key heads), the ranking's peak extra memory is a few [H, chunk, N] blocks, far below the 156 MB of M, and
    grows linearly with N (twice the tokens: about twice the peak, where O(N^2) would be four times). The
    unit-normal q/k make float32 underflow, so the widest attempt (float64 blocks) is measured too."""
    heads, kv_heads, dim, chunk = 14, 2, 64, 64
    gen = torch.Generator().manual_seed(0)
    peaks = {}
    for tokens in (834, 1669):
        queries = torch.randn(1, heads, tokens, dim, generator=gen)
        keys = torch.randn(1, kv_heads, tokens, dim, generator=gen)
        pos, valid = torch.arange(tokens)[None], torch.ones(1, tokens, dtype=torch.bool)
        assert bool((pagerank_importance(queries, keys, pos, pos, valid, dim**-0.5) < SAFE_MIN_SCORE).any())
        peaks[tokens] = peak_extra_bytes(lambda: ranking_importance(queries, keys, pos, pos, valid, valid, dim**-0.5,
                                                                    chunk_size=chunk))
    float64_block = heads * chunk * 1669 * 8
    matrix = heads * 1669 * 1669 * 4
    assert peaks[1669] <= 3 * float64_block < matrix / 3
    assert peaks[1669] / peaks[834] < 2.5

import math

import pytest
import torch

import leanvlm.ops.importance as importance
from leanvlm.ops.attention import received_attention
from leanvlm.ops.importance import pagerank_importance

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


def make_inputs(seed: int = 0):
    """Row 0: TOKENS real tokens; row 1: PAD left-padding slots, then TOKENS - PAD real tokens."""
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randn(BATCH, HEADS, TOKENS, DIM, generator=gen)
    keys = torch.randn(BATCH, KV_HEADS, TOKENS, DIM, generator=gen)
    valid = torch.ones(BATCH, TOKENS, dtype=torch.bool)
    valid[1, :PAD] = False
    pos = torch.stack([torch.arange(TOKENS), (torch.arange(TOKENS) - PAD).clamp(min=0)])
    return queries, keys, pos, valid


@pytest.fixture
def chunk_calls(monkeypatch):
    """Count how often the attention matrix is (re)computed."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    original = importance.attention_probability_chunks
    monkeypatch.setattr(importance, "attention_probability_chunks", counting)
    return calls


@pytest.mark.parametrize("chunk_size", [1, 4, 13, 64])
@pytest.mark.parametrize(("max_matrix_bytes", "builds"), [(0, 5), (2**30, 1)], ids=["chunked", "materialised"])
def test_matches_dense_reference(chunk_size, max_matrix_bytes, builds, chunk_calls):
    queries, keys, pos, valid = make_inputs()
    got = pagerank_importance(
        queries, keys, pos, pos, valid, SCALE, chunk_size=chunk_size, max_matrix_bytes=max_matrix_bytes
    )
    assert got.dtype == torch.float32 and got.shape == (BATCH, TOKENS)
    assert len(chunk_calls) == builds  # the materialised path builds M once, the chunked one per iteration
    expected = dense_pagerank(queries, keys, pos, pos, valid, SCALE)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-7)


def test_materialises_exactly_when_the_matrix_fits(chunk_calls):
    queries, keys, pos, valid = make_inputs()
    size = BATCH * HEADS * TOKENS * TOKENS * 4
    pagerank_importance(queries, keys, pos, pos, valid, SCALE, max_matrix_bytes=size)
    pagerank_importance(queries, keys, pos, pos, valid, SCALE, max_matrix_bytes=size - 1)
    assert len(chunk_calls) == 1 + 5


@pytest.mark.parametrize("tau", [1.0, 0.1, 0.02])
@pytest.mark.parametrize("iterations", [0, 1, 5])
def test_tau_and_iterations_follow_the_definition(tau, iterations):
    queries, keys, pos, valid = make_inputs(seed=1)
    got = pagerank_importance(queries, keys, pos, pos, valid, SCALE, tau=tau, iterations=iterations, chunk_size=5)
    expected = dense_pagerank(queries, keys, pos, pos, valid, SCALE, tau, iterations)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-7)


def test_invalid_slots_score_zero_and_padding_does_not_change_real_tokens():
    queries, keys, pos, valid = make_inputs()
    for max_bytes in (0, 2**30):
        scores = pagerank_importance(queries, keys, pos, pos, valid, SCALE, max_matrix_bytes=max_bytes)
        assert torch.equal(scores[1, :PAD], torch.zeros(PAD))
        alone = pagerank_importance(
            queries[1:, :, PAD:], keys[1:, :, PAD:], pos[1:, PAD:], pos[1:, PAD:], valid[1:, PAD:], SCALE,
            max_matrix_bytes=max_bytes,
        )
        torch.testing.assert_close(scores[1, PAD:], alone[0], rtol=1e-5, atol=1e-8)


def test_single_head_scores_are_a_distribution():
    # one head: score = p, and p @ M keeps its total mass (every valid row of M sums to 1)
    queries, keys, pos, valid = make_inputs(seed=2)
    scores = pagerank_importance(queries[:, :1], keys[:, :1], pos, pos, valid, SCALE)
    torch.testing.assert_close(scores.sum(1), torch.ones(BATCH))


@pytest.mark.parametrize("max_matrix_bytes", [0, 2**30])
def test_constant_and_empty_inputs_give_no_nan(max_matrix_bytes):
    queries, keys = torch.zeros(2, 2, 6, 4), torch.ones(2, 1, 6, 4)
    pos = torch.arange(6).expand(2, -1)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1] = False  # a row without any real token
    scores = pagerank_importance(queries, keys, pos, pos, valid, 0.5, max_matrix_bytes=max_matrix_bytes)
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
from leanvlm.ops.importance import SAFE_MIN_SCORE, pagerank_log_importance, ranking_importance  # noqa: E402


def sharp_inputs(seed: int = 2, magnitude: float = 3.5):
    """Queries/keys so large that tau = 0.1 sharpened float32 probabilities underflow to exactly 0, while
    float64 (exp down to e^-745) still represents every entry."""
    queries, keys, pos, valid = make_inputs(seed)
    return queries * magnitude, keys * magnitude, pos, valid


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
@pytest.mark.parametrize("max_matrix_bytes", [0, 2**30], ids=["chunked", "materialised"])
def test_log_importance_is_the_log_of_the_float64_reference(chunk_size, max_matrix_bytes):
    queries, keys, pos, valid = sharp_inputs()
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

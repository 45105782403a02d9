"""Property tests for ops.select and ops.attention (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from leanvlm.ops.attention import received_attention
from leanvlm.ops.select import FILLER, gather_rows, gather_slots, pack_right, top_k_mask

masks = st.integers(1, 4).flatmap(
    lambda b: st.integers(0, 12).flatmap(
        lambda n: st.lists(st.lists(st.booleans(), min_size=n, max_size=n), min_size=b, max_size=b)))


@settings(deadline=None, max_examples=60)
@given(masks)
def test_pack_right_keeps_order_counts_and_right_alignment(rows):
    keep = torch.tensor(rows, dtype=torch.bool).view(len(rows), -1)
    index = pack_right(keep)
    counts = keep.sum(dim=1)
    assert index.shape == (keep.shape[0], int(counts.max()) if keep.numel() else 0)
    for b in range(keep.shape[0]):
        real = index[b][index[b] != FILLER]
        assert real.tolist() == keep[b].nonzero().flatten().tolist()  # ascending, exactly the kept ones
        assert (index[b, : index.shape[1] - int(counts[b])] == FILLER).all()  # fillers on the left


@settings(deadline=None, max_examples=60)
@given(st.integers(1, 3), st.integers(1, 10), st.integers(0, 2**31 - 1), st.booleans())
def test_top_k_mask_picks_the_k_best_candidates(batch, length, seed, constant):
    g = torch.Generator().manual_seed(seed)
    scores = torch.zeros(batch, length) if constant else torch.randn(batch, length, generator=g)
    candidates = torch.rand(batch, length, generator=g) > 0.3
    keep = torch.randint(0, length + 1, (batch,), generator=g)
    chosen = top_k_mask(scores, candidates, keep)
    assert not (chosen & ~candidates).any()
    assert chosen.sum(dim=1).tolist() == torch.minimum(keep, candidates.sum(dim=1)).tolist()
    for b in range(batch):
        if chosen[b].any() and (candidates[b] & ~chosen[b]).any():
            assert scores[b][chosen[b]].min() >= scores[b][candidates[b] & ~chosen[b]].max()
    if constant:  # ties go to the earliest positions: deterministic
        for b in range(batch):
            first = candidates[b].nonzero().flatten()[: int(chosen[b].sum())]
            assert chosen[b].nonzero().flatten().tolist() == first.tolist()


@settings(deadline=None, max_examples=40)
@given(masks, st.integers(1, 3))
def test_gather_slots_fills_fillers_and_copies_the_rest(rows, width):
    keep = torch.tensor(rows, dtype=torch.bool).view(len(rows), -1)
    index = pack_right(keep)
    values = torch.randn(keep.shape[0], keep.shape[1], width)
    out = gather_slots(values, index, fill=-7.0)
    for b in range(keep.shape[0]):
        for j, i in enumerate(index[b].tolist()):
            assert torch.equal(out[b, j], torch.full((width,), -7.0) if i == FILLER else values[b, i])


@pytest.mark.parametrize("rest", [(), (5,), (3, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool, torch.long])
def test_gather_rows_equals_torch_gather_and_broadcasts_a_batch_of_one(rest, dtype):
    gen = torch.Generator().manual_seed(0)
    values = (torch.randn(3, 7, *rest, generator=gen) * 5).to(dtype)
    index = torch.randint(0, 7, (3, 4), generator=gen)
    expanded = index.view(3, 4, *(1,) * len(rest)).expand(3, 4, *rest)
    assert torch.equal(gather_rows(values, index), torch.gather(values, 1, expanded))
    assert torch.equal(gather_rows(values[:1], index), torch.gather(values[:1].expand_as(values), 1, expanded))
    transposed = values.transpose(0, 1).contiguous().transpose(0, 1)  # not contiguous
    assert torch.equal(gather_rows(transposed, index), torch.gather(values, 1, expanded))


@settings(deadline=None, max_examples=40)
@given(st.integers(1, 2), st.integers(1, 3), st.integers(2, 9), st.integers(1, 4), st.integers(0, 2**31 - 1),
       st.booleans())
def test_received_attention_matches_dense_masked_softmax(batch, heads, n, chunk, seed, constant):
    g = torch.Generator().manual_seed(seed)
    q = torch.zeros(batch, heads, n, 4) if constant else torch.randn(batch, heads, n, 4, generator=g)
    k = torch.zeros(batch, 1, n, 4) if constant else torch.randn(batch, 1, n, 4, generator=g)
    pos = torch.arange(n).expand(batch, -1)
    valid = torch.rand(batch, n, generator=g) > 0.2
    valid[:, 0] = True
    got = received_attention(q, k, pos, pos, valid, 0.5, chunk_size=chunk)
    logits = (q @ k.expand(-1, heads, -1, -1).transpose(-1, -2)) * 0.5
    allowed = valid[:, None, None, :] & (pos[:, None, None, :] <= pos[:, None, :, None])
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    torch.testing.assert_close(got, probs.mean(dim=(1, 2)), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(got).all()
    assert (got[~valid] == 0).all()


@settings(deadline=None, max_examples=30)
@given(st.integers(2, 8), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_received_attention_with_log_size_bias_equals_attention_to_copies(n, copies, seed):
    """key_bias = log(s) on one key = that key repeated s times (proportional attention): the biased attention it
    receives is the sum over its copies, every other key's is unchanged."""
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 2, n, 4, generator=g), torch.randn(1, 1, n, 4, generator=g)
    pos = torch.arange(n)[None]
    valid = torch.ones(1, n, dtype=torch.bool)
    bias = torch.zeros(1, n)
    bias[0, 0] = torch.tensor(float(copies)).log()
    got = received_attention(q, k, pos, pos, valid, 0.5, chunk_size=3, key_bias=bias)
    # the same keys with key 0 repeated `copies` times at position 0
    repeated = torch.cat([k[:, :, :1].expand(-1, -1, copies, -1), k[:, :, 1:]], dim=2)
    rep_pos = torch.cat([torch.zeros(1, copies, dtype=torch.long), pos[:, 1:]], dim=1)
    dense = received_attention(q, repeated, pos, rep_pos, torch.ones(1, n + copies - 1, dtype=torch.bool), 0.5)
    expected = torch.cat([dense[:, :copies].sum(dim=1, keepdim=True), dense[:, copies:]], dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    if copies > 1:
        assert not torch.allclose(got, received_attention(q, k, pos, pos, valid, 0.5), atol=1e-4)

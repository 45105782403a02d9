import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from leanvlm.ops.merge import bipartite_merge_pass, merge_schedule, merge_tokens

FAST = settings(deadline=None, max_examples=40)


def reference_pass(x: torch.Tensor, metric: torch.Tensor, r: int, sizes: torch.Tensor, weighted: bool):
    """SPEC 1a steps 1-6 for ONE row, written with plain Python loops. x [T, C], metric [T, Cm], sizes [T]."""
    xs, ms, ss = x.tolist(), metric.tolist(), sizes.tolist()
    num_tokens = len(xs)
    r = min(r, num_tokens // 2)
    if r <= 0:
        return xs, ss, list(range(num_tokens))

    def norm(v):
        return max(math.sqrt(sum(a * a for a in v)), 1e-12)

    def cosine(i, j):
        return sum(a * b for a, b in zip(ms[i], ms[j])) / (norm(ms[i]) * norm(ms[j]))

    sources, destinations = list(range(0, num_tokens, 2)), list(range(1, num_tokens, 2))
    best, best_dst = [], []
    for a in sources:
        sims = [cosine(a, b) for b in destinations]
        best.append(max(sims))
        best_dst.append(destinations[sims.index(max(sims))])  # first maximum
    ranking = sorted(range(len(sources)), key=lambda k: -best[k])  # stable: lower source first on ties
    merged_into = {sources[k]: best_dst[k] for k in ranking[:r]}
    survivors = [t for t in range(num_tokens) if t not in merged_into]
    out_tokens, out_sizes, assignment = [], [], [None] * num_tokens
    for slot, t in enumerate(survivors):
        members = [t] + [s for s, d in merged_into.items() if d == t]
        weights = [ss[m] if weighted else 1.0 for m in members]
        channels = range(len(xs[0]))
        out_tokens.append([sum(w * xs[m][c] for w, m in zip(weights, members)) / sum(weights) for c in channels])
        out_sizes.append(sum(ss[m] for m in members))
        for m in members:
            assignment[m] = slot
    return out_tokens, out_sizes, assignment


def random_case(seed: int, batch: int, num_tokens: int, channels: int, clustered: bool = False):
    gen = torch.Generator().manual_seed(seed)
    if clustered:  # few distinct directions so that many similarities are close and merges cluster
        centres = torch.randn(3, channels, generator=gen, dtype=torch.float64)
        labels = torch.randint(0, 3, (batch, num_tokens), generator=gen)
        x = centres[labels] + 0.1 * torch.randn(batch, num_tokens, channels, generator=gen, dtype=torch.float64)
    else:
        x = torch.randn(batch, num_tokens, channels, generator=gen, dtype=torch.float64)
    sizes = torch.randint(1, 5, (batch, num_tokens), generator=gen).double()
    return x, sizes


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 3),
    num_tokens=st.integers(1, 24),
    channels=st.integers(1, 6),
    r=st.integers(-1, 14),
    weighted=st.booleans(),
    clustered=st.booleans(),
)
def test_pass_matches_loop_reference(seed, batch, num_tokens, channels, r, weighted, clustered):
    x, sizes = random_case(seed, batch, num_tokens, channels, clustered)
    metric = x[..., : max(1, channels - 1)] + 0.5  # a metric that is not x itself
    out = bipartite_merge_pass(x, metric, r, sizes, weighted)
    for row in range(batch):
        tokens, ref_sizes, assignment = reference_pass(x[row], metric[row], r, sizes[row], weighted)
        assert out.assignment[row].tolist() == assignment
        torch.testing.assert_close(out.tokens[row], torch.tensor(tokens, dtype=torch.float64), rtol=1e-12, atol=1e-12)
        assert out.sizes[row].tolist() == ref_sizes


def test_pass_ties_and_constant_input_are_defined():
    # All similarities tie: sources 0, 2, .. are merged (lowest first) into the first destination (1).
    x = torch.full((2, 8, 3), 0.7)
    out = bipartite_merge_pass(x, x, 3, weighted=True)
    assert out.assignment[0].tolist() == [0, 0, 0, 1, 0, 2, 3, 4]
    assert out.kept_indices[0].tolist() == [1, 3, 5, 6, 7]
    assert out.sizes[0].tolist() == [4, 1, 1, 1, 1]
    assert torch.equal(out.tokens, torch.full((2, 5, 3), 0.7))


@pytest.mark.parametrize("value", [0.0, 3.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_constant_and_zero_inputs_give_no_nan(value, weighted):
    x = torch.full((3, 196, 8), value)
    out = merge_tokens(x, None, keep=0.1, weighted=weighted)
    assert out.tokens.shape == (3, 20, 8)
    assert not out.tokens.isnan().any()
    assert torch.equal(out.tokens, torch.full_like(out.tokens, value))


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 3),
    num_tokens=st.integers(1, 60),
    keep=st.floats(0.001, 1.0),
    weighted=st.booleans(),
    separate_metric=st.booleans(),
)
def test_merge_tokens_properties(seed, batch, num_tokens, keep, weighted, separate_metric):
    x, _ = random_case(seed, batch, num_tokens, 4, clustered=True)
    metric = x.flip(-1)[..., :3] if separate_metric else None
    out = merge_tokens(x, metric, keep, weighted=weighted)
    expected = num_tokens - sum(merge_schedule(num_tokens, keep))
    assert expected == max(1, round(keep * num_tokens))
    assert out.tokens.shape == (batch, expected, 4)
    assert out.sizes.shape == out.kept_indices.shape == (batch, expected)
    assert out.assignment.shape == (batch, num_tokens)
    # order: survivors ascending, each survivor sits in its own slot, every slot is used
    assert (out.kept_indices.diff(dim=1) > 0).all()
    assert torch.equal(out.assignment.gather(1, out.kept_indices), torch.arange(expected).expand(batch, -1))
    for row in range(batch):
        counts = torch.bincount(out.assignment[row], minlength=expected)
        assert torch.equal(out.sizes[row], counts.float())
    if weighted:  # the size-weighted mean of a group is the exact mean of its original tokens
        group_sum = torch.zeros_like(out.tokens).index_put_(
            (torch.arange(batch)[:, None].expand(-1, num_tokens), out.assignment), x, accumulate=True
        )
        torch.testing.assert_close(out.tokens, group_sum / out.sizes[..., None].double())
        torch.testing.assert_close((out.tokens * out.sizes[..., None]).sum(1), x.sum(1))
    if separate_metric:
        assert out.metric.shape == (batch, expected, 3)
    else:
        assert out.metric is out.tokens


@FAST
@given(seed=st.integers(0, 2**31 - 1), num_tokens=st.integers(2, 40), r=st.integers(1, 20))
def test_plain_pass_is_the_plain_group_mean_and_keeps_unmerged_tokens(seed, num_tokens, r):
    x, sizes = random_case(seed, 2, num_tokens, 5)
    out = bipartite_merge_pass(x, x, r, sizes, weighted=False)
    for row in range(2):
        for slot in range(out.tokens.shape[1]):
            members = (out.assignment[row] == slot).nonzero().flatten()
            torch.testing.assert_close(out.tokens[row, slot], x[row, members].mean(0))
            assert out.sizes[row, slot] == sizes[row, members].sum()
            if len(members) == 1:  # untouched tokens are copied, in order
                assert members.item() == out.kept_indices[row, slot]


def test_rows_are_merged_independently():
    x, _ = random_case(0, 4, 50, 6, clustered=True)
    batched = merge_tokens(x, None, keep=0.2)
    for row in range(4):
        alone = merge_tokens(x[row : row + 1], None, keep=0.2)
        assert torch.equal(alone.assignment[0], batched.assignment[row])
        torch.testing.assert_close(alone.tokens[0], batched.tokens[row])


def test_low_precision_inputs_use_fp32_similarity_and_keep_dtype():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 196, 32, generator=gen).to(torch.bfloat16)
    low = bipartite_merge_pass(x, x, 98)
    high = bipartite_merge_pass(x.float(), x.float(), 98)
    assert low.tokens.dtype == torch.bfloat16
    # identical input values: a bf16 similarity would rank near-ties differently from the fp32 one
    assert torch.equal(low.assignment, high.assignment)
    torch.testing.assert_close(low.tokens, high.tokens.to(torch.bfloat16))


def test_schedule_defaults_and_limits():
    assert merge_schedule(196, 0.25) == [98, 49]
    assert merge_schedule(196, 0.5) == [98]
    assert merge_schedule(196, 1.0) == []
    assert merge_schedule(1, 0.01) == []
    assert merge_schedule(0, 0.5) == []
    assert merge_schedule(196, 0.1) == [98, 49, 24, 5]


@FAST
@given(num_tokens=st.integers(0, 5000), keep=st.floats(1e-6, 1.0))
def test_schedule_reaches_target_with_valid_passes(num_tokens, keep):
    schedule = merge_schedule(num_tokens, keep)
    current = num_tokens
    for r in schedule:
        assert 1 <= r <= current // 2
        current -= r
    assert current == max(1, round(keep * num_tokens)) or num_tokens == 0


@pytest.mark.parametrize("keep", [0.0, -0.25, 1.5, float("nan"), float("inf")])
def test_schedule_rejects_bad_keep(keep):
    with pytest.raises(ValueError, match=f"got {keep!r}"):
        merge_schedule(196, keep)


def clustered_frames(num_frames: int, seed: int = 0, side: int = 14, segments: int = 12, channels: int = 64):
    """Blob-shaped segments on a side x side raster: each segment one random direction + 30% noise."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2).float()
    frames = []
    for _ in range(num_frames):
        seeds = torch.rand(segments, 2, generator=gen) * side
        labels = torch.cdist(grid, seeds).argmin(1)
        centres = torch.randn(segments, channels, generator=gen)
        frames.append(centres[labels] + 0.3 * torch.randn(side * side, channels, generator=gen))
    return torch.stack(frames)


def relative_reconstruction_error(x: torch.Tensor, keep: float, weighted: bool) -> float:
    out = merge_tokens(x, None, keep, weighted=weighted)
    rebuilt = out.tokens.gather(1, out.assignment[..., None].expand(-1, -1, x.shape[-1]))
    spread = (x - x.mean(1, keepdim=True)).pow(2).sum(-1).mean()
    return ((x - rebuilt).pow(2).sum(-1).mean() / spread).item()


def test_reconstruction_weighted_vs_plain():
    """The measurement behind merge_tokens' default (printed with -s; numbers in ops/merge.py)."""
    x = clustered_frames(64)
    keeps = (0.5, 0.25, 0.125, 0.0625)
    errors = {keep: [relative_reconstruction_error(x, keep, w) for w in (False, True)] for keep in keeps}
    for keep, (plain, weighted) in errors.items():
        print(f"keep={keep:<7} passes={len(merge_schedule(196, keep))} plain={plain:.4f} weighted={weighted:.4f}")
    assert errors[0.5][0] == errors[0.5][1]  # one pass: all sizes are 1, the two means coincide
    for keep in (0.25, 0.125, 0.0625):
        assert errors[keep][1] < errors[keep][0]


@pytest.mark.parametrize("tokens", [1, 7, 64, 196, 256])
@pytest.mark.parametrize("keep", [0.1, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("fraction", [0.05, 0.25, 0.5])
def test_schedule_pass_fraction_caps_every_pass_and_reaches_the_target(tokens, keep, fraction):
    schedule = merge_schedule(tokens, keep, fraction)
    current = tokens
    for r in schedule:
        assert 1 <= r <= max(1, int(current * fraction)) and r <= current // 2
        current -= r
    assert current == max(1, round(keep * tokens))


def test_schedule_rejects_a_pass_fraction_a_bipartite_pass_cannot_do():
    with pytest.raises(ValueError, match=r"pass_fraction must be in \(0, 0.5\], got 0.6"):
        merge_schedule(10, 0.5, 0.6)

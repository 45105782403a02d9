import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from leanvlm.ops.knee import find_knee, find_knee_batched

METHODS = ["kneedle", "second_difference", "largest_drop"]


def corner_curve(corner: int = 10, total: int = 100) -> torch.Tensor:
    """Steep line from 1 to 0.2 over the first `corner` points, then a shallow line to 0."""
    return torch.cat([torch.linspace(1.0, 0.2, corner), torch.linspace(0.19, 0.0, total - corner)])


def shuffled(scores: torch.Tensor, seed: int = 0) -> torch.Tensor:
    return scores[torch.randperm(len(scores), generator=torch.Generator().manual_seed(seed))]


@pytest.mark.parametrize(("method", "expected"), [("kneedle", 10), ("second_difference", 10), ("largest_drop", 9)])
def test_piecewise_linear_corner(method, expected):
    # the corner is point 10 (1-based); largest_drop cuts after the last steep drop, i.e. before it
    assert find_knee(shuffled(corner_curve()), method) == expected


@pytest.mark.parametrize("decay", [5.0, 10.0, 40.0])
def test_kneedle_on_exponential_decay_matches_the_analytic_knee(decay):
    n = 200
    scores = torch.exp(-torch.arange(n, dtype=torch.float64) / decay)
    # normalised curve y(x) = (e^{-ax} - e^{-a}) / (1 - e^{-a}), a = (n-1)/decay; the knee is where y' = -1
    a = (n - 1) / decay
    x_star = math.log(a / (1 - math.exp(-a))) / a
    assert abs(find_knee(shuffled(scores), "kneedle") - (1 + x_star * (n - 1))) <= 1.0


def test_alternatives_put_a_smooth_decay_knee_at_the_start_and_k_min_applies():
    scores = torch.exp(-torch.arange(100.0) / 10)
    assert find_knee(scores, "second_difference") == 2
    assert find_knee(scores, "largest_drop") == 1
    assert find_knee(scores, "largest_drop", k_min=8) == 8


def test_largest_drop_finds_a_gap():
    scores = torch.cat([torch.linspace(1.0, 0.9, 7), torch.linspace(0.3, 0.0, 50)])
    assert find_knee(shuffled(scores), "largest_drop") == 7


FLAT, STRAIGHT, CONCAVE = torch.full((17,), 0.3), torch.linspace(1.0, 0.0, 1000), 1 - torch.linspace(0, 1, 50) ** 2


@pytest.mark.parametrize(
    ("method", "scores", "expected"),
    [(m, FLAT, 17) for m in METHODS]
    + [(m, STRAIGHT, 1000) for m in METHODS]
    + [("kneedle", CONCAVE, 50), ("second_difference", CONCAVE, 50), ("largest_drop", CONCAVE, 49)],
)
def test_curves_without_knee_keep_everything(method, scores, expected):
    # a concave curve's largest drop is its last one, so largest_drop keeps all but the last token
    assert find_knee(scores, method) == expected


@pytest.mark.parametrize("method", METHODS)
def test_tiny_inputs(method):
    assert find_knee(torch.tensor([0.4]), method) == 1
    assert find_knee(torch.tensor([0.4]), method, k_min=5) == 1  # clamp to N wins over k_min
    assert find_knee(torch.tensor([0.9, 0.1]), method) in (1, 2)
    assert find_knee(torch.tensor([0.9, 0.1]), "second_difference") == 2


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scores_raise(bad):
    with pytest.raises(ValueError, match="NaN or inf"):
        find_knee(torch.tensor([0.5, bad, 0.1]))
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        find_knee_batched(torch.tensor([[0.5, 0.2, 0.1], [0.5, bad, 0.1]]))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown knee method 'elbow'"):
        find_knee(corner_curve(), "elbow")
    with pytest.raises(ValueError, match="k_min must be >= 1, got 0"):
        find_knee(corner_curve(), k_min=0)
    with pytest.raises(ValueError, match="1-D"):
        find_knee(torch.empty(0))


def test_batched_rows_are_independent_and_respect_valid():
    curves = torch.stack([corner_curve(10), corner_curve(30), torch.full((100,), 2.0)])
    assert find_knee_batched(curves).tolist() == [10, 30, 100]
    # a shorter row padded with garbage (even NaN) behaves like its valid prefix alone
    valid = torch.ones(3, 100, dtype=torch.bool)
    valid[1, 60:] = False
    valid[2] = False
    padded = curves.clone()
    padded[1, 60:] = float("nan")
    expected = find_knee(curves[1, :60])
    assert find_knee_batched(padded, valid=valid).tolist() == [10, expected, 0]


@settings(deadline=None, max_examples=60)
@given(
    values=st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=40),
    method=st.sampled_from(METHODS),
    k_min=st.integers(1, 10),
)
def test_result_is_in_range_and_order_invariant(values, method, k_min):
    scores = torch.tensor(values, dtype=torch.float64)
    k = find_knee(scores, method, k_min)
    assert min(k_min, len(values)) <= k <= len(values)
    assert find_knee(scores.flip(0), method, k_min) == k
    assert find_knee_batched(torch.stack([scores, scores.flip(0)]), method, k_min).tolist() == [k, k]

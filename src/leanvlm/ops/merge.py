"""AIM's iterative bipartite soft matching before the LLM (SPEC 1a).

Each row of the batch (one image or one video frame) is merged on its own; nothing crosses rows, so all
rows must have the same token count T. A pass merges the r most redundant even-position tokens (sources)
into their most similar odd-position token (destinations) and keeps the survivors in their original
order. Several passes reach any keep ratio (`merge_schedule`).

Bookkeeping returned with every result (`MergeResult`), all relative to the tokens that were passed in:
- `assignment [B, T]`: output slot each input token ended up in. Compose passes with
  `later.assignment.gather(1, earlier.assignment)`; tokens with the same value form one merge group
  (colour by it in a visualisation, or average any per-token quantity over the group).
- `kept_indices [B, T']`: input index of the token that survived in each output slot (the destination
  or the unmerged source), ascending. Use it to keep original position ids (1-D or M-RoPE 3-D) or to
  find which newline/grid cell an output token came from.
- `sizes [B, T']`: number of original tokens represented by each output token.
- `metric [B, T', Cm]`: the metric merged with the same assignment and the same mean (plain or
  size-weighted) as the tokens, so the next pass matches on the merged representatives. When the metric
  is the tokens themselves (SPEC default: the projector output) it is exactly `tokens`.

Plain vs size-weighted mean (`merge_tokens(weighted=True)` is the default): the reconstruction error
of the original tokens from their merged representative, mean ||x_i - out[assignment_i]||^2 relative to
the mean ||x_i - frame mean||^2, on 64 frames of clustered synthetic data (14 x 14 raster, 12 blob-shaped
segments, each a random direction in C = 64 plus noise at 30% of its norm; metric = tokens):

    keep     passes   plain    weighted
    0.5      1        0.0395   0.0395    (identical: every size is 1 in the first pass)
    0.25     2        0.0696   0.0665    (-4%)
    0.125    4        0.0991   0.0886    (-11%)
    0.0625   5        0.2859   0.2421    (-15%)

    command: .venv/bin/python -m pytest tests/test_ops_merge.py -k reconstruction -s

Weighted won in every one of 9 variants (`clustered_frames(seed=0..2, segments=6/12/30)` in that test):
-3..-6% at 2 passes, -8..-11% at 4, -9..-17% at 5. The size-weighted mean is the exact mean of a group's original tokens
(its least-squares representative), whereas the plain mean over-weights tokens merged late, and the
gap grows with the number of passes; weighted is the default even for the 2-pass default schedule.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from leanvlm.ops.select import gather_rows


class MergeResult(NamedTuple):
    """Merged tokens and the bookkeeping to relate them to the input (shapes: input [B, T], output T')."""

    tokens: torch.Tensor  # [B, T', C], dtype of the input tokens
    sizes: torch.Tensor  # [B, T'] float32, original tokens represented by each output token
    assignment: torch.Tensor  # [B, T] int64, output slot of every input token
    kept_indices: torch.Tensor  # [B, T'] int64, ascending input index of each output slot's survivor
    metric: torch.Tensor  # [B, T', Cm], the metric merged like the tokens


def _merge_groups(
    values: torch.Tensor,
    kept_indices: torch.Tensor,
    merged_pos: torch.Tensor,
    dst_pos: torch.Tensor,
    dst_slot: torch.Tensor,
    share: torch.Tensor,
) -> torch.Tensor:
    """Weighted group means of values [B, T, D] -> [B, T', D], touching only the merged tokens.

    Each merged source s (positions merged_pos [B, r]) moves its destination (positions dst_pos, output
    slots dst_slot [B, r]) by share_s * (x_s - x_dst) with share_s = w_s / W_group [B, r]:
    x_dst + sum_s w_s / W (x_s - x_dst) = (w_dst x_dst + sum_s w_s x_s) / W. Survivors are copied, so
    unmerged tokens stay bit-exact, and the work is O(r * D) beyond the copy instead of O(T * D).
    Accumulates in at least float32 so fp16/bf16 groups of many tokens do not lose precision.
    """
    acc_dtype = torch.promote_types(values.dtype, torch.float32)
    batch, dim = values.shape[0], values.shape[-1]

    def rows(positions: torch.Tensor) -> torch.Tensor:
        return gather_rows(values, positions).to(acc_dtype)

    # rows() returns new tensors, so the arithmetic runs in place (no [B, r, D] temporaries to allocate)
    delta = rows(merged_pos).sub_(rows(dst_pos)).mul_(share.to(acc_dtype)[..., None])  # [B, r, D]
    out = rows(kept_indices)  # [B, T', D]
    # index_add_ over the flattened (batch x T') rows: like scatter_add_ along dimension 1 (the same
    # additions in the same order), without an index expanded over D (~2x faster on CPU)
    flat_slot = (dst_slot + torch.arange(batch, device=dst_slot.device)[:, None] * out.shape[1]).reshape(-1)
    out.view(-1, dim).index_add_(0, flat_slot, delta.reshape(-1, dim))
    return out.to(values.dtype)


def bipartite_merge_pass(
    x: torch.Tensor,
    metric: torch.Tensor,
    r: int,
    sizes: torch.Tensor | None = None,
    weighted: bool = False,
) -> MergeResult:
    """One pass of bipartite soft matching, per row of x (SPEC 1a steps 1-6).

    x [B, T, C]; metric [B, T, Cm] (may be x itself); sizes [B, T] (default all 1). Sources are the
    tokens at even positions, destinations those at odd positions. Similarity is cosine in at least
    float32. The r = min(r, T // 2) sources with the highest best-destination similarity are merged into
    their best destination, whose value becomes the mean of itself and the sources sent to it: plain
    (every token weight 1) or, with `weighted`, weighted by `sizes`. `sizes` are summed either way.
    r <= 0 returns the input unchanged (identity bookkeeping).

    Ties are broken deterministically: a source's best destination is the lowest-index one among equal
    similarities, and among equal `best` scores the lower-index source is merged first. A zero metric
    vector has similarity 0 to everything (no NaN).

    Returns a `MergeResult` with T' = T - r (see the module docstring for the fields).
    """
    if x.dim() != 3 or metric.dim() != 3 or metric.shape[:2] != x.shape[:2]:
        raise ValueError(f"need x [B, T, C] and metric [B, T, Cm], got {tuple(x.shape)} and {tuple(metric.shape)}")
    batch, num_tokens, _ = x.shape
    if sizes is None:
        sizes = torch.ones(batch, num_tokens, dtype=torch.float32, device=x.device)
    elif sizes.shape != x.shape[:2]:
        raise ValueError(f"sizes must be [B, T] = {tuple(x.shape[:2])}, got {tuple(sizes.shape)}")
    sizes = sizes.float()

    r = min(r, num_tokens // 2)
    if r <= 0:
        identity = torch.arange(num_tokens, device=x.device).expand(batch, -1)
        return MergeResult(x, sizes, identity, identity, metric)

    sim_dtype = torch.promote_types(metric.dtype, torch.float32)
    metric_hi = metric.to(sim_dtype)
    # cosine = dot / (|a| |b|): dividing the [T/2, T/2] products is cheaper than normalising [T, Cm]
    norms = torch.linalg.vector_norm(metric_hi, dim=-1).clamp(min=1e-12)
    dots = metric_hi[:, 0::2] @ metric_hi[:, 1::2].transpose(1, 2)  # [B, ceil(T/2), floor(T/2)]
    similarity = dots / (norms[:, 0::2, None] * norms[:, None, 1::2])
    best, best_dst = similarity.max(dim=-1)  # [B, ceil(T/2)] each
    merged_src = torch.argsort(best, dim=-1, descending=True, stable=True)[:, :r]  # [B, r], source ranks

    merged_pos = 2 * merged_src  # original positions of the merged sources
    dst_pos = 2 * best_dst.gather(1, merged_src) + 1  # [B, r], original positions of their destinations
    survives = torch.ones(batch, num_tokens, dtype=torch.bool, device=x.device)
    survives.scatter_(1, merged_pos, False)
    # Survivors are numbered in original order: this is what keeps raster order in the output.
    slot = survives.long().cumsum(dim=1) - 1  # [B, T], valid for survivors
    dst_slot = slot.gather(1, dst_pos)
    assignment = slot.scatter(1, merged_pos, dst_slot)
    # Stable sort of "is merged" puts the T - r survivors first, still in ascending position order.
    kept_indices = torch.argsort((~survives).to(torch.uint8), dim=1, stable=True)[:, : num_tokens - r]

    num_out = num_tokens - r
    # shares in the accumulation precision: float32 shares like 1/3 would cost float64 inputs accuracy
    share_dtype = torch.promote_types(torch.promote_types(x.dtype, metric.dtype), torch.float32)
    weights = (sizes if weighted else torch.ones_like(sizes)).to(share_dtype)
    group_weight = torch.zeros(batch, num_out, dtype=share_dtype, device=x.device).scatter_add_(1, assignment, weights)
    share = weights.gather(1, merged_pos) / group_weight.gather(1, dst_slot)
    tokens = _merge_groups(x, kept_indices, merged_pos, dst_pos, dst_slot, share)
    merged_metric = tokens if metric is x else _merge_groups(metric, kept_indices, merged_pos, dst_pos, dst_slot, share)
    new_sizes = torch.zeros(batch, num_out, dtype=torch.float32, device=x.device).scatter_add_(1, assignment, sizes)
    return MergeResult(tokens, new_sizes, assignment, kept_indices, merged_metric)


def merge_schedule(num_tokens: int, keep: float, pass_fraction: float = 0.5) -> list[int]:
    """Tokens to remove in each pass so that T = num_tokens ends at max(1, round(keep * T)).

    Greedy: every pass removes as many as it may — at most `pass_fraction` of its current count (at
    least 1), and never more than half of it (a bipartite pass cannot) — until the target is reached.
    With the default 0.5 the number of passes is minimal: keep = 0.25 on 196 tokens gives [98, 49]
    (196 -> 98 -> 49, SPEC default). A pass that removes half of its tokens merges EVERY source, however
    dissimilar its best match; a smaller pass_fraction merges only the most similar pairs of each pass
    (more passes), e.g. 0.25 on 256 tokens at keep 0.25: [64, 48, 36, 27, 17]. keep = 1.0 gives []
    (identity). `round` is Python's (half to even). Raises ValueError unless 0 < keep <= 1,
    0 < pass_fraction <= 0.5 and num_tokens >= 0.
    """
    if not (isinstance(keep, (int, float)) and math.isfinite(keep) and 0.0 < keep <= 1.0):
        raise ValueError(f"keep must be a ratio in (0, 1], got {keep!r}")
    if not (isinstance(pass_fraction, (int, float)) and 0.0 < pass_fraction <= 0.5):
        raise ValueError(f"pass_fraction must be in (0, 0.5], got {pass_fraction!r}")
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    target = max(1, round(keep * num_tokens))
    schedule: list[int] = []
    current = num_tokens
    while current > target:
        r = min(current // 2, max(1, math.floor(current * pass_fraction)), current - target)
        schedule.append(r)
        current -= r
    return schedule


def merge_tokens(
    x: torch.Tensor,
    metric: torch.Tensor | None,
    keep: float,
    weighted: bool = True,
    sizes: torch.Tensor | None = None,
    pass_fraction: float = 0.5,
) -> MergeResult:
    """Merge every row of x [B, T, C] down to max(1, round(keep * T)) tokens in `merge_schedule` passes
    (each removing at most `pass_fraction` of its tokens).

    metric [B, T, Cm] or None (= x, the SPEC default); sizes [B, T] (default all 1). `weighted` picks
    the size-weighted mean (default; measured in the module docstring) or the plain mean. Between passes
    the metric is merged with the same assignment and mean as the tokens. The returned `assignment [B, T]`
    and `kept_indices [B, T']` are composed over all passes, i.e. relative to the original T tokens.
    """
    if x.dim() != 3:
        raise ValueError(f"need x [B, T, C], got {tuple(x.shape)}")
    result = bipartite_merge_pass(x, x if metric is None else metric, 0, sizes)
    for r in merge_schedule(x.shape[1], keep, pass_fraction):
        step = bipartite_merge_pass(result.tokens, result.metric, r, result.sizes, weighted)
        result = MergeResult(
            step.tokens,
            step.sizes,
            step.assignment.gather(1, result.assignment),
            result.kept_indices.gather(1, step.kept_indices),
            step.metric,
        )
    return result

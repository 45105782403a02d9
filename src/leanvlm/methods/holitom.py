"""HoliTom (Shao et al., "HoliTom: Holistic Token Merging for Fast Video Large Language Models",
NeurIPS 2025, arXiv 2505.21334; published code github.com/cokeshao/HoliTom), per video (an image is a
one-frame video): steps 1-4 before the LLM, step 5 inside it.

1. Global redundancy-aware temporal segmentation: s[t, p] = cosine of patch position p between frames t
   and t + 1 (projector output). A window of frames [a, b] can keep one token for each position static
   across it (s > tau on every transition inside), removing static * (b - a) tokens; the partition of the
   video into windows that removes the most is found by dynamic programming (`ops.temporal.static_windows`,
   windows of at most `max_window` frames).
2. The budget: about keep * F * T of the video's F * T tokens; after the temporal step the static and
   spatial merges keep the fraction r = min(1, keep * F T / (F T - removed)) of what is left.
3. Temporal merging, per window of >= 2 frames: each static position's tokens are averaged over the
   window into one token that lives in the window's first frame; the static tokens (of all positions)
   are then clustered by density peaks (DPC-kNN, `ops.temporal.density_peak_scores`, k = min(k, centres))
   into round(r * S) centres, every other static token joins its nearest centre (Euclidean), and a centre
   with members becomes beta * centre + (1 - beta) * mean(members) (a centre alone stays; when round(r * S)
   is 0 the window's static tokens are all dropped, as published).
4. Spatial merging, per frame, of its dynamic (non-static) tokens: n' = ceil(r * n) are kept, of which
   round(n' * (1 - contextual_share)) dominant tokens with the highest vision attention, and the rest
   contextual: density-peak centres among the remaining tokens, merged like the static ones.
   Outputs keep raster order per frame; merged tokens stand for their centre's patch.
5. Inner-LLM merging (`SimilarityMerge`, the paper's "M"): after decoder layer `inner_layer`, the
   inner_keep * V visual tokens (V: those in the sequence, round, at least 1) that the last token attends
   to most (head-averaged, that layer's attention, as FastV) stay; every other visual token is merged into
   the kept visual token whose hidden state (the layer's output) is most cosine-similar, by the published
   code's in-place average: visiting the dropped tokens in ascending position, target <- (target + token)
   / 2, so a target with members m_1 < ... < m_n becomes 2^-n target + sum_k 2^-(n-k+1) m_k
   (`pairwise_average_merge`). The merged tokens are then dropped from the sequence, the positions, the
   mask and the later layers' KV cache like any in-LLM drop; kept tokens keep their RoPE positions.

Defaults (the published LLaVA-OneVision scripts): keep = 0.10, tau = 0.65 at keep <= 0.10 and 0.80 above
(`tau=None`), beta = 0.6, contextual_share (the code's D) = 0, k = 7, max_window = 1024; inner merge
HOLITOM_k = 18, HOLITOM_r = 0.5 on the 28-layer LLaVA-OneVision-7B: inner_keep = 1 - r = 0.5 and
inner_layer = None = round(18 L / 28) - 1 for an L-layer LLM (17 of 28: the code merges before 0-indexed
layer 18 using layer 17's attention, which is leanvlm's "after layer 17"), at most L - 2.
`inner_keep=1.0` leaves step 5 out: the paper's "HoliTom (w/o M)".

Deviations from the published code:
- Attention: the adapters' `cls_attention` signal ranks dominant tokens (CLS query; SigLIP, which has
  none, uses the mean token as the query, see `models.vision`); the code uses the last SigLIP layer's
  attention averaged over heads and queries.
- keep = 1.0 returns the input unchanged (the code still averages every window's static tokens).
- Density ties are broken by index (the code adds random noise), top-k ties to the lower index.
- Images (and any single frame) run the spatial step alone with r = keep, the code's one-frame window
  branch; the code leaves images unreduced. Step 5 runs on images too.
- The frames of a video must still be position-aligned (HoliTom first, or after stages that keep every
  frame's token set): a clear ValueError otherwise.
- Step 5: per sample of a batch (the code ranks with sample 0's attention, batch size 1); the model's
  newline tokens (LLaVA-OneVision) are never merged nor dropped (the code's visual span includes the
  video's trailing newline); the weights are applied in float32 in one step (the code halves in the
  model's dtype, rounding after every member); similarity ties go to the earlier kept token (the code:
  the more attended one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from leanvlm.methods._frames import FrameGroups, frame_signal, rebuild
from leanvlm.methods.base import LLMStage, Method, PreLLMStage, check_fraction
from leanvlm.methods.fastv import LastTokenAttentionDrop
from leanvlm.ops.pool import assignment_weights, combine
from leanvlm.ops.select import FILLER
from leanvlm.ops.temporal import consecutive_similarity, density_peak_scores, static_windows, top_indices
from leanvlm.runtime.context import LayerContext
from leanvlm.runtime.stages import HiddenMerge
from leanvlm.runtime.visual import VisualItem

#: the published scripts' tau per retention ratio: 0.65 at 10% (and below), 0.80 at 15% - 25%
LOW_KEEP_TAU, TAU = 0.65, 0.80
#: the published scripts' inner-LLM merge on LLaVA-OneVision-7B (a 28-layer Qwen2): HOLITOM_k = 18 (merge
#: before 0-indexed layer 18, scored with layer 17's attention), HOLITOM_r = 0.5 (half the visual tokens merged)
PAPER_INNER_K, PAPER_DEPTH, PAPER_INNER_KEEP = 18, 28, 0.5


@dataclass
class ClusterMerge:
    """Tokens x [N, C] clustered to `centres` density peaks: outputs [K, C], the centre each output
    stands for (indices into x) [K], and every token's output slot [N] (-1 = dropped)."""

    tokens: torch.Tensor
    centre: torch.Tensor
    assignment: torch.Tensor


def cluster_merge(x: torch.Tensor, centres: int, k: int, beta: float) -> ClusterMerge:
    """HoliTom's density-peak merge of x [N, C] into `centres` tokens (see the module doc, step 3)."""
    count = x.shape[0]
    if centres <= 0 or count == 0:
        return ClusterMerge(x[:0], torch.zeros(0, dtype=torch.long, device=x.device),
                            torch.full((count,), FILLER, dtype=torch.long, device=x.device))
    scores, distances = density_peak_scores(x[None], min(k, centres, count))
    centre = torch.sort(top_indices(scores[0], centres)).values  # [K], ascending
    assignment = distances[0][:, centre].argmin(dim=1)  # [N]: nearest centre (ties: the earlier centre)
    assignment[centre] = torch.arange(centres, device=x.device)
    is_member = torch.ones(count, dtype=torch.bool, device=x.device)
    is_member[centre] = False
    members = assignment_weights(torch.where(is_member, assignment, FILLER), centres)  # [K, N]
    has_members = members.sum(dim=1) > 0
    lonely = (~has_members).nonzero().squeeze(1)
    members[lonely, centre[lonely]] = 1.0  # a centre without members: its "mean" is itself (unused below)
    member_mean = combine(x, members)
    acc = torch.promote_types(x.dtype, torch.float32)
    blended = beta * x[centre].to(acc) + (1 - beta) * member_mean.to(acc)
    tokens = torch.where(has_members[:, None], blended, x[centre].to(acc)).to(x.dtype)
    return ClusterMerge(tokens, centre, assignment)


@dataclass
class HolisticMerge(PreLLMStage):
    """HoliTom's outer-LLM stage (see the module doc): temporal windows, static merge, spatial merge."""

    keep: float = 0.1
    tau: float | None = None
    beta: float = 0.6
    contextual_share: float = 0.0
    k: int = 7
    max_window: int = 1024

    needs = frozenset({"cls_attention"})

    @property
    def threshold(self) -> float:
        """tau, or the published scripts' value for this keep."""
        if self.tau is not None:
            return self.tau
        return LOW_KEEP_TAU if self.keep <= 0.1 + 1e-9 else TAU

    def planned_tokens(self, tokens_per_frame: int) -> int:
        # the spatial step's count on a frame without temporal redundancy (input-dependent otherwise)
        return min(tokens_per_frame, math.ceil(tokens_per_frame * self.keep))

    def reduce(self, item: VisualItem) -> VisualItem:
        if self.keep == 1.0 or item.num_tokens == 0:
            return item
        frames = item.frames
        aligned = all(f.shape[0] == frames[0].shape[0] and torch.equal(o, item.origin[0])
                      for f, o in zip(frames, item.origin))
        if not aligned:
            raise ValueError("HoliTom needs position-aligned frames (the same patches in every frame of a video); "
                             "apply it before stages that reduce frames differently")
        stacked = torch.stack(frames)  # [F, T, C]
        count, tokens = stacked.shape[:2]
        similarity = consecutive_similarity(stacked)  # [F - 1, T]
        windows, removed = static_windows(similarity, self.threshold, self.max_window)
        ratio = min(1.0, self.keep * count * tokens / (count * tokens - removed))
        attention = [frame_signal(item, "cls_attention", f, "HoliTom").float() for f in range(count)]
        results: list[FrameGroups] = []
        for start, end in windows:
            static = torch.zeros(tokens, dtype=torch.bool, device=stacked.device)
            if end > start:
                static = (similarity[start:end] > self.threshold).all(dim=0)
            static_positions = static.nonzero().squeeze(1)
            dynamic_positions = (~static).nonzero().squeeze(1)
            static_merge = None
            if static_positions.numel():
                averaged = stacked[start:end + 1, static_positions].float().mean(dim=0).to(stacked.dtype)  # [S, C]
                static_merge = cluster_merge(averaged, round(static_positions.numel() * ratio), self.k, self.beta)
            for f in range(start, end + 1):
                results.append(self._frame(stacked[f], attention[f], dynamic_positions, static_positions,
                                           static_merge if f == start else None, ratio))
        return rebuild(item, results)

    def _frame(self, frame: torch.Tensor, attention: torch.Tensor, dynamic: torch.Tensor, static: torch.Tensor,
               static_merge: ClusterMerge | None, ratio: float) -> FrameGroups:
        """One frame's outputs: its dynamic tokens merged spatially, plus the window's static tokens if
        it is the window's first frame (static positions of later frames were merged into those)."""
        device = frame.device
        assignment = torch.full((frame.shape[0],), FILLER, dtype=torch.long, device=device)
        outputs, representative = [], []
        if static_merge is not None:
            outputs.append(static_merge.tokens)
            representative.append(static[static_merge.centre])
            assignment[static] = static_merge.assignment
        n = dynamic.numel()
        kept = min(n, math.ceil(n * ratio))
        dominant_count = round(kept * (1 - self.contextual_share))
        contextual_count = kept - dominant_count
        dominant = torch.sort(dynamic[top_indices(attention[dynamic], dominant_count)]).values
        offset = sum(o.shape[0] for o in outputs)
        outputs.append(frame[dominant])
        representative.append(dominant)
        assignment[dominant] = offset + torch.arange(dominant.numel(), device=device)
        if contextual_count > 0:
            is_rest = torch.ones(frame.shape[0], dtype=torch.bool, device=device)
            is_rest[static] = False
            is_rest[dominant] = False
            rest = is_rest.nonzero().squeeze(1)
            merged = cluster_merge(frame[rest], contextual_count, self.k, self.beta)
            offset += dominant.numel()
            outputs.append(merged.tokens)
            representative.append(rest[merged.centre])
            assignment[rest] = torch.where(merged.assignment >= 0, offset + merged.assignment, FILLER)
        return FrameGroups(torch.cat(outputs), torch.cat(representative), assignment)


def inner_merge_layer(num_layers: int) -> int:
    """The published K = 18 of 28 layers scaled to a depth L, in leanvlm's convention (the layer whose
    attention ranks and after which the tokens merge): round(18 L / 28) - 1, at most L - 2 so that a later
    layer computes on the merged tokens. 28 layers -> 17, 24 -> 14, 4 -> 2."""
    if num_layers < 2:
        raise ValueError(f"HoliTom's inner-LLM merge needs at least 2 decoder layers, the model has {num_layers}; "
                         "pass inner_keep=1.0 to leave it out")
    return max(0, min(num_layers - 2, round(PAPER_INNER_K * num_layers / PAPER_DEPTH) - 1))


def pairwise_average_merge(sources: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The published inner-LLM merge of one sample, in closed form: every source (dropped token) goes to the
    target (kept token) of highest cosine similarity, and the targets are updated in place source by
    source in ascending position, target <- (target + source) / 2. A target with n members m_1 < ... < m_n
    thus ends as 2^-n target + sum_k 2^-(n - k + 1) m_k.

    sources [S, D], targets [K, D] hidden states, each in ascending position. -> (nearest [S] long: the
    target of every source, source_weight [S], target_weight [K]: the weights of the new target states;
    1 for a target without members)."""
    unit_sources = sources.float() / torch.linalg.vector_norm(sources.float(), dim=-1, keepdim=True).clamp(min=1e-12)
    unit_targets = targets.float() / torch.linalg.vector_norm(targets.float(), dim=-1, keepdim=True).clamp(min=1e-12)
    nearest = (unit_sources @ unit_targets.T).argmax(dim=1)  # [S]; ties: the earlier target
    members = torch.bincount(nearest, minlength=targets.shape[0])  # [K]
    # rank of every source among its target's members (0 = the first merged), sources being in position order
    by_target = torch.argsort(nearest, stable=True)
    first_member = torch.cumsum(members, 0) - members  # [K]
    rank = torch.empty_like(nearest)
    rank[by_target] = torch.arange(nearest.numel(), device=nearest.device) - first_member[nearest[by_target]]
    later_members = members[nearest] - 1 - rank  # the halvings a source still goes through after its own
    source_weight = torch.pow(0.5, (later_members + 1).float())
    target_weight = torch.pow(0.5, members.float())
    return nearest, source_weight, target_weight


@dataclass
class SimilarityMerge(LastTokenAttentionDrop):
    """HoliTom's inner-LLM merge (module doc, step 5): after `layer` (None: `inner_merge_layer` of the model's
    depth) keep `keep` of the visual tokens by the last token's attention, as FastV does, and fold every
    other visual token into its most similar kept visual token (cosine of the layer's output hidden states)
    before the drop."""

    layer: int | None = None
    keep: float = PAPER_INNER_KEEP

    def layers(self, num_layers: int) -> list[int]:
        return [inner_merge_layer(num_layers) if self.layer is None else self.layer]

    def merge(self, ctx: LayerContext, kept: torch.Tensor) -> HiddenMerge:
        visual = ctx.visual  # [B, N]
        target = torch.full(visual.shape, FILLER, dtype=torch.long, device=visual.device)
        weight = torch.zeros(visual.shape, dtype=torch.float32, device=visual.device)
        for row in range(visual.shape[0]):
            sources = (visual[row] & ~kept[row]).nonzero().squeeze(1)  # ascending: the published loop's order
            targets = (visual[row] & kept[row]).nonzero().squeeze(1)
            if sources.numel() == 0 or targets.numel() == 0:
                continue
            nearest, source_weight, target_weight = pairwise_average_merge(ctx.hidden[row, sources], ctx.hidden[row, targets])
            target[row, sources] = targets[nearest]
            weight[row, sources] = source_weight
            has_members = torch.bincount(nearest, minlength=targets.numel()) > 0  # the others stay as they are
            target[row, targets[has_members]] = targets[has_members]
            weight[row, targets[has_members]] = target_weight[has_members]
        return HiddenMerge(target, weight)


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


@dataclass
class HoliTom(Method):
    """HoliTom: temporal windows + static and spatial density-peak merging of every video (and image) before
    the LLM, to about `keep` of the visual tokens; then, after decoder layer `inner_layer` (None: the
    published 18 of 28 scaled to the depth), `inner_keep` of them stay and the rest merge into their most
    similar kept token. `inner_keep=1.0` leaves the inner merge out (the paper's "HoliTom (w/o M)").
    See the module doc."""

    keep: float = 0.1
    tau: float | None = None
    beta: float = 0.6
    contextual_share: float = 0.0
    k: int = 7
    max_window: int = 1024
    inner_keep: float = PAPER_INNER_KEEP
    inner_layer: int | None = None

    def __post_init__(self) -> None:
        check_fraction("keep", self.keep)
        check_fraction("inner_keep", self.inner_keep)
        if self.inner_layer is not None and (isinstance(self.inner_layer, bool) or not isinstance(self.inner_layer, int)
                                             or self.inner_layer < 0):
            raise ValueError(f"inner_layer must be a decoder layer index >= 0 or None, got {self.inner_layer!r}")
        if self.tau is not None and (isinstance(self.tau, bool) or not isinstance(self.tau, (int, float))
                                     or not -1 <= self.tau <= 1):
            raise ValueError(f"tau must be a cosine similarity in [-1, 1] or None, got {self.tau!r}")
        check_fraction("beta", self.beta, allow_zero=True)
        check_fraction("contextual_share", self.contextual_share, allow_zero=True)
        _check_positive_int("k", self.k)
        _check_positive_int("max_window", self.max_window)

    def stages(self) -> tuple[Sequence[PreLLMStage], Sequence[LLMStage]]:
        outer = HolisticMerge(self.keep, self.tau, self.beta, self.contextual_share, self.k, self.max_window)
        inner = () if self.inner_keep == 1.0 else (SimilarityMerge(self.inner_layer, self.inner_keep),)
        return (outer,), inner

    @classmethod
    def budget_options(cls, keep_fraction: float, num_layers: int) -> dict[str, float]:
        """Visual-token budget b -> (keep, inner_keep) at the default inner layer l of L layers: layers 0..l
        see keep * V and the rest inner_keep of that, so keep = b L / (l + 1 + (L - l - 1) inner_keep) with
        the published inner_keep 0.5; when that exceeds 1, keep = 1 and inner_keep = (b L - l - 1) / (L - l - 1)."""
        full = inner_merge_layer(num_layers) + 1  # layers that see every token that entered the LLM
        keep = keep_fraction * num_layers / (full + (num_layers - full) * PAPER_INNER_KEEP)
        if keep <= 1.0:
            return {"keep": keep, "inner_keep": PAPER_INNER_KEEP}
        return {"keep": 1.0, "inner_keep": (keep_fraction * num_layers - full) / (num_layers - full)}

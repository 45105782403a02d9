"""FastVID (Shen et al., "FastVID: Dynamic Density Pruning for Fast Video Large Language Models",
arXiv 2503.11187; published code github.com/LunarShen/FastVID), before the LLM, per video (an image is
a one-frame video, so one segment):

1. Dynamic temporal segmentation (DySeg, `ops.temporal.transition_segments`): the frames' global features
   (the mean of each frame's tokens) give transition similarities between consecutive frames; a
   transition is a cut if it is among the c - 1 least similar (c = `min_segments`) or below `tau`.
2. Density spatiotemporal pruning (STPrune), every frame keeping R = max(1, floor(keep * T)) of its T
   tokens on average:
   - ATS: the floor(salient_share * R) tokens of each frame with the highest vision attention are kept.
   - DTM, per segment of L frames: anchor frames at every `anchor_step`-th frame from the segment's first;
     each anchor frame picks L * (R - salient) // anchors anchor tokens among its tokens not kept by ATS,
     the highest DPC-kNN density-peak scores (`ops.temporal.density_peak_scores`, k nearest); every token
     of the segment not kept by ATS joins its most similar anchor token (cosine), and an anchor token with
     n tokens (itself included) becomes alpha * anchor + (1 - alpha) * mean(its tokens), alpha =
     max(1 / (n + 1), beta).
Outputs keep raster order per frame; an anchor token stands for its own patch in its anchor frame.

Defaults (the published scripts): keep = 0.10 (retention ratio), min_segments c = 8, tau = 0.9,
salient_share d = 0.4, anchor_step p = 4, beta = 0.6, k = 4.

Deviations from the published code:
- Global feature of a frame: the mean of its projector-output tokens (the code takes the vision tower's
  global feature); vision attention: the adapters' `cls_attention` (SigLIP: mean-token query).
- Density: the k NEAREST tokens (the paper's kNN density; the published `calc_density_score` takes
  `topk` of the distances without `largest=False`, i.e. the k farthest); ties by index instead of noise.
- Merging averages the tokens themselves (the code averages the L2-normalised tokens, so its contextual
  tokens have unit norm); cosine similarity is used for the assignment only, as in the code.
- R = max(1, floor(keep * T)) (the code's int() keeps no token of a frame when keep * T < 1); an anchor
  frame picks at most the tokens it has left after ATS (the code's top-k fails there); fewer transitions
  than c - 1 make every frame its own segment (the code's top-k fails there); an anchor token that
  nothing joined (an identical earlier anchor token took even itself) stays as it is (the code scales
  it by alpha).
- keep = 1.0 returns the input unchanged. Frames of a video must have equal token counts (FastVID first,
  or after stages that keep the same count per frame): a clear ValueError otherwise.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from leanvlm.methods._frames import FrameGroups, frame_signal, rebuild
from leanvlm.methods.base import LLMStage, Method, PreLLMStage, check_fraction
from leanvlm.ops.pool import assignment_weights, combine
from leanvlm.ops.select import FILLER
from leanvlm.ops.temporal import density_peak_scores, top_indices, transition_segments
from leanvlm.runtime.visual import VisualItem


def retained_per_frame(tokens: int, keep: float) -> int:
    """R: tokens a frame of `tokens` keeps on average (0 for an empty frame)."""
    return min(tokens, max(1, math.floor(tokens * keep))) if tokens else 0


@dataclass
class DensityPrune(PreLLMStage):
    """FastVID's pre-LLM stage (see the module doc): DySeg, then ATS + DTM per segment."""

    keep: float = 0.1
    min_segments: int = 8
    tau: float = 0.9
    salient_share: float = 0.4
    anchor_step: int = 4
    beta: float = 0.6
    k: int = 4

    needs = frozenset({"cls_attention"})

    def planned_tokens(self, tokens_per_frame: int) -> int:
        return retained_per_frame(tokens_per_frame, self.keep)

    def reduce(self, item: VisualItem) -> VisualItem:
        if self.keep == 1.0 or item.num_tokens == 0:
            return item
        frames = item.frames
        tokens = frames[0].shape[0]
        if any(f.shape[0] != tokens for f in frames):
            raise ValueError(f"FastVID needs the same token count in every frame of a video, got "
                             f"{[f.shape[0] for f in frames]}; apply it before stages that reduce frames differently")
        stacked = torch.stack(frames)  # [F, T, C]
        device = stacked.device
        retained = retained_per_frame(tokens, self.keep)
        salient_count = math.floor(self.salient_share * retained)
        contextual_count = retained - salient_count
        attention = torch.stack([frame_signal(item, "cls_attention", f, "FastVID").float() for f in range(len(frames))])
        salient = torch.sort(top_indices(attention, salient_count), dim=1).values  # [F, s]
        is_rest = torch.ones(stacked.shape[:2], dtype=torch.bool, device=device)
        is_rest.scatter_(1, salient, False)
        rest = is_rest.nonzero()[:, 1].view(len(frames), tokens - salient_count)  # [F, n], ascending per frame
        outputs = [[stacked[f, salient[f]]] for f in range(len(frames))]
        representative = [[salient[f]] for f in range(len(frames))]
        assignment = torch.full(stacked.shape[:2], FILLER, dtype=torch.long, device=device)
        assignment.scatter_(1, salient, torch.arange(salient_count, device=device).expand(len(frames), -1))
        lengths = transition_segments(stacked.float().mean(dim=1), self.min_segments, self.tau)
        rest_tokens = stacked[torch.arange(len(frames), device=device)[:, None], rest]  # [F, n, C]
        if rest.shape[1] and contextual_count:
            # Density peaks are only read on anchor frames (every anchor_step-th frame of a segment): score
            # those alone (each frame is scored on its own, so the values do not change).
            starts = [0, *itertools.accumulate(lengths)][:-1]  # first frame of each segment
            anchor_frames = torch.tensor([f for start, length in zip(starts, lengths)
                                          for f in range(start, start + length, self.anchor_step)], device=device)
            anchor_scores, _ = density_peak_scores(rest_tokens[anchor_frames], min(self.k, rest.shape[1]))
            scores = anchor_scores.new_zeros(rest.shape)  # [F, n], read on anchor frames only
            scores[anchor_frames] = anchor_scores
            for start, length in zip(starts, lengths):
                self._segment(rest, rest_tokens, scores, start, length, contextual_count, salient_count, outputs,
                              representative, assignment)
        results = [FrameGroups(torch.cat(outputs[f]), torch.cat(representative[f]), assignment[f])
                   for f in range(len(frames))]
        return rebuild(item, results)

    def _segment(self, rest: torch.Tensor, rest_tokens: torch.Tensor, scores: torch.Tensor, start: int, length: int,
                 contextual_count: int, salient_count: int, outputs: list, representative: list,
                 assignment: torch.Tensor) -> None:
        """DTM on frames start .. start + length - 1 (rest [F, n]: each frame's tokens not kept by ATS,
        rest_tokens [F, n, C] their features, scores [F, n] their density-peak scores): anchor tokens, and
        every rest token of the segment merged into its most similar one. Appends to outputs /
        representative of the anchor frames and fills `assignment` [F, T] of the segment's frames."""
        device = rest.device
        n = rest.shape[1]
        anchors = torch.arange(start, start + length, self.anchor_step, device=device)  # [A]
        per_anchor = min(length * contextual_count // anchors.numel(), n)
        if per_anchor == 0:
            return
        chosen = top_indices(scores[anchors], per_anchor).sort(dim=1).values  # [A, a] into rest, raster order
        flat = rest_tokens.flatten(0, 1)  # [F n, C]
        anchor_tokens = flat[(anchors[:, None] * n + chosen).flatten()]  # [A a, C]
        members = flat[start * n:(start + length) * n]  # [L n, C]
        unit_members, unit_anchors = (x.float() / torch.linalg.vector_norm(x.float(), dim=-1, keepdim=True)
                                      .clamp(min=1e-12) for x in (members, anchor_tokens))
        nearest = (unit_members @ unit_anchors.T).argmax(dim=1)  # [L n]: anchor slot (ties: the earlier one)
        weights = assignment_weights(nearest, anchor_tokens.shape[0])  # [A a, L n]
        counts = weights.sum(dim=1, keepdim=True)  # n_i: tokens joined (the anchor itself, unless an equal one won)
        lonely = (counts[:, 0] == 0).nonzero().squeeze(1)
        own = ((anchors[:, None] - start) * n + chosen).flatten()  # each anchor token's own place among members
        weights[lonely, own[lonely]] = 1.0  # its mean is itself; alpha = 1 below keeps it unchanged
        alpha = (1.0 / (counts + 1)).clamp(min=self.beta)
        acc = torch.promote_types(rest_tokens.dtype, torch.float32)
        merged = (alpha * anchor_tokens.to(acc) + (1 - alpha) * combine(members, weights).to(acc)).to(rest_tokens.dtype)
        for slot, frame in enumerate(anchors.tolist()):
            outputs[frame].append(merged[slot * per_anchor:(slot + 1) * per_anchor])
            representative[frame].append(rest[frame, chosen[slot]])
        member_frame = torch.arange(start, start + length, device=device).repeat_interleave(n)
        member_position = rest[start:start + length].flatten()
        at_home = anchors.repeat_interleave(per_anchor)[nearest] == member_frame  # merged within its own frame
        assignment[member_frame[at_home], member_position[at_home]] = salient_count + nearest[at_home] % per_anchor


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


@dataclass
class FastVID(Method):
    """FastVID: dynamic temporal segmentation + attention selection and density-based merging per segment,
    before the LLM, to about `keep` of every frame's tokens. See the module doc."""

    keep: float = 0.1
    min_segments: int = 8
    tau: float = 0.9
    salient_share: float = 0.4
    anchor_step: int = 4
    beta: float = 0.6
    k: int = 4

    def __post_init__(self) -> None:
        check_fraction("keep", self.keep)
        _check_positive_int("min_segments", self.min_segments)
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not -1 <= self.tau <= 1:
            raise ValueError(f"tau must be a cosine similarity in [-1, 1], got {self.tau!r}")
        check_fraction("salient_share", self.salient_share, allow_zero=True)
        _check_positive_int("anchor_step", self.anchor_step)
        check_fraction("beta", self.beta, allow_zero=True)
        _check_positive_int("k", self.k)

    def stages(self) -> tuple[Sequence[PreLLMStage], Sequence[LLMStage]]:
        return (DensityPrune(self.keep, self.min_segments, self.tau, self.salient_share, self.anchor_step, self.beta,
                             self.k),), ()

    @classmethod
    def budget_options(cls, keep_fraction: float, num_layers: int) -> dict[str, float]:
        """Visual-token budget -> keep = budget (every LLM layer sees the pre-LLM count)."""
        return {"keep": keep_fraction}

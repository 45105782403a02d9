"""VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
CVPR 2025, arXiv 2412.04467), before the LLM, per image / video frame:

1. Dominant tokens: the `dominant` patches the CLS token attends to most in the vision layer the
   projector reads (LLaVA: the penultimate), head-averaged.
2. Contextual tokens: of the remaining patches (in raster order), `contextual` targets are taken at a
   uniform stride (every max(1, R // contextual)-th of the R remaining, the first `contextual` of them);
   every other remaining patch joins the target whose key (same vision layer) is most similar (cosine),
   and each contextual token is target + mean(patches that joined it) (the published code's formula: the
   mean excludes the target and is 0 when nothing joined; the sum is not renormalised).

Defaults: the paper's LLaVA-1.5 64-token setting, dominant=54 + contextual=10 per image (of 576). Counts
larger than a frame are clamped (dominant first, then contextual), so a frame never grows.
Fraction spec (scales to any token count): `VisionZip(keep=0.111)` keeps total = max(1, round(keep * T))
tokens of each frame of T, of which contextual = round(total * contextual_share) (default share 10/64,
the paper's ratio) and dominant = the rest. Give counts or keep, not both.

Anyres crops (`per_crop=True`, the default, as published): the published LLaVA-NeXT code runs the vision
tower on the base image and on every high-resolution crop separately, so each crop keeps its own
dominant + contextual tokens, ranked and merged among that crop's patches only. LLaVA-NeXT, LLaVA-NeXT-Video
(images) and LLaVA-OneVision hand the stage the base tile as one item and the stitched, unpadded
high-resolution grid as another, whose `crops` says which crop every grid cell came from; the grid is
reduced crop by crop:
- counts: every crop keeps dominant + contextual, clamped to the tokens it still has after unpadding
  (the published code keeps them of the full, padded 24 x 24 crop); a 2 x 2 grid at the default keeps up
  to 64 (base) + 4 x 64 = 320 tokens, the paper's LLaVA-NeXT 320-token setting;
- keep: the grid keeps the same total as without crops, max(1, round(keep * T)), shared over the crops in
  proportion to their tokens (largest remainder, ties to the earlier crop), each crop's share split into
  dominant / contextual by contextual_share;
- LLaVA-OneVision shrinks a grid larger than `vision_aspect_ratio` allows by bilinear interpolation, which
  blends neighbouring cells across crop borders: such a cell belongs to the crop of its largest weight.
`per_crop=False` ranks the whole grid as one item (leanvlm before issue 21). Families without anyres crops
(LLaVA-1.5, Qwen, Gemma 3, InternVL / Idefics3 tiles, which are one item each already) are unaffected.

Deviations from the paper's code:
- The CLS token itself is not kept: the published code spends one of the `dominant` slots on CLS, but
  our adapters hand the stage patch tokens only (LLaVA's "default" feature strategy drops CLS before the
  projector); all `dominant` slots go to patches.
- Tokens are reduced after the projector (the stage sees projector outputs) instead of before it, so a
  contextual token is the mean of projected patches rather than the projection of a mean (the projector
  is an MLP, so the two differ slightly).
- The similarity metric is the layer's keys with the heads concatenated (the code averages keys over
  heads first); outputs keep raster order (the code appends the contextual tokens after the dominant).
- Towers without CLS (SigLIP) rank by the mean token's attention instead (`models.vision`'s substitute).
- Anyres crops are reduced after the model's unpadding: a crop's padding patches are never candidates
  (the published code ranks all 576 patches of a padded crop and then places the kept ones in the
  stitched grid without unpadding it); the kept tokens stay in raster order of the unpadded grid, with the
  model's newline after every row (the code drops the newlines and appends every crop's contextual tokens
  after the grid).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from leanvlm.methods._frames import FrameGroups, frame_signal, rebuild
from leanvlm.methods.base import LLMStage, Method, PreLLMStage, check_fraction
from leanvlm.runtime.visual import VisualItem

PAPER_DOMINANT = 54
PAPER_CONTEXTUAL = 10


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int token count >= 0, got {value!r}")
    return value


def apportion(total: int, sizes: list[int]) -> list[int]:
    """Split `total` tokens over groups of `sizes` tokens in proportion to their sizes (largest remainder:
    floors first, the leftover to the largest fractional parts, ties to the earlier group); the parts sum to
    `total` and none exceeds its group when total <= sum(sizes)."""
    whole = sum(sizes)
    quotas = [total * size / whole for size in sizes]
    parts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(sizes)), key=lambda g: (-(quotas[g] - parts[g]), g))
    for group in by_remainder[: total - sum(parts)]:
        parts[group] += 1
    return parts


def dominant_contextual(tokens: torch.Tensor, attention: torch.Tensor, keys: torch.Tensor | None, dominant: int,
                        contextual: int) -> FrameGroups:
    """VisionZip on one group of tokens (a frame, or one anyres crop of it), see the module doc.

    tokens [T, C]; attention [T] (CLS attention); keys [T, D] (needed when contextual > 0); dominant +
    contextual <= T. -> FrameGroups over these T tokens (indices local to the group)."""
    count = tokens.shape[0]
    device = tokens.device
    order = torch.sort(attention.float(), descending=True, stable=True).indices  # ties: earlier patch first
    is_dominant = torch.zeros(count, dtype=torch.bool, device=device)
    is_dominant[order[:dominant]] = True
    assignment = torch.full((count,), -1, dtype=torch.long, device=device)
    dominant_idx = is_dominant.nonzero().squeeze(1)
    assignment[dominant_idx] = torch.arange(dominant, device=device)
    representative = [dominant_idx]
    outputs = [tokens[dominant_idx]]
    if contextual > 0:
        rest = (~is_dominant).nonzero().squeeze(1)  # raster order
        step = max(1, rest.numel() // contextual)
        targets = rest[torch.arange(0, rest.numel(), step, device=device)[:contextual]]
        is_target = torch.zeros(count, dtype=torch.bool, device=device)
        is_target[targets] = True
        others = rest[~is_target[rest]]
        unit_keys = keys.float()
        unit_keys = unit_keys / torch.linalg.vector_norm(unit_keys, dim=-1, keepdim=True).clamp(min=1e-12)
        nearest = (unit_keys[others] @ unit_keys[targets].T).argmax(dim=1)  # ties: the earlier target
        assignment[targets] = dominant + torch.arange(contextual, device=device)
        assignment[others] = dominant + nearest
        joined = torch.bincount(nearest, minlength=contextual).clamp(min=1)  # [contextual]
        weights = torch.zeros(contextual, count, dtype=torch.float32, device=device)  # target + mean(joined)
        weights[torch.arange(contextual, device=device), targets] = 1.0
        weights[nearest, others] = 1.0 / joined[nearest].float()
        outputs.append((weights @ tokens.float()).to(tokens.dtype))
        representative.append(targets)
    return FrameGroups(torch.cat(outputs), torch.cat(representative), assignment)


@dataclass
class DominantContextual(PreLLMStage):
    """VisionZip's pre-LLM stage (see the module doc). Either counts (dominant, contextual) or keep;
    per_crop: an item stitched from several anyres crops is reduced crop by crop, each with its own budget."""

    dominant: int | None = PAPER_DOMINANT
    contextual: int | None = PAPER_CONTEXTUAL
    keep: float | None = None
    contextual_share: float = PAPER_CONTEXTUAL / (PAPER_DOMINANT + PAPER_CONTEXTUAL)
    per_crop: bool = True

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"cls_attention", "keys"})

    def counts(self, tokens: int) -> tuple[int, int]:
        """(dominant, contextual) kept of a frame (or crop) with `tokens` tokens."""
        if self.keep is None:
            dominant = min(self.dominant, tokens)
            return dominant, min(self.contextual, tokens - dominant)
        total = min(tokens, max(1, round(self.keep * tokens))) if tokens else 0
        return self._split(total)

    def _split(self, total: int) -> tuple[int, int]:
        contextual = round(total * self.contextual_share)
        return total - contextual, contextual

    def planned_tokens(self, tokens_per_frame: int) -> int:
        return sum(self.counts(tokens_per_frame))

    def crop_budgets(self, crop_sizes: list[int]) -> list[tuple[int, int]]:
        """(dominant, contextual) of every crop of one frame, given the tokens each crop holds now. Counts
        apply to every crop (as published: each crop is its own encoder pass); a keep fraction gives the
        frame the same total as without crops, shared over the crops in proportion to their tokens."""
        if self.keep is None:
            return [self.counts(size) for size in crop_sizes]
        total = sum(self.counts(sum(crop_sizes)))
        return [self._split(part) for part in apportion(total, crop_sizes)]

    def reduce(self, item: VisualItem) -> VisualItem:
        results = [self._frame(item, f) for f in range(len(item.frames))]
        if all(r is None for r in results):
            return item
        return rebuild(item, [FrameGroups.identity(frame) if r is None else r for frame, r in zip(item.frames, results)])

    def _groups(self, item: VisualItem, f: int) -> list[torch.Tensor]:
        """The current tokens of frame f to rank together, as ascending index tensors: one group per anyres
        crop (per_crop and the item has crops; a crop every token of which an earlier stage removed has
        none), else the whole frame."""
        tokens = item.frames[f].shape[0]
        everything = torch.arange(tokens, device=item.frames[f].device)
        if not self.per_crop or item.crops is None:
            return [everything]
        crop_of_token = item.crops.to(everything.device)[item.origin[f]]  # [T]: a merged token's representative's crop
        return [everything[crop_of_token == crop] for crop in torch.unique(crop_of_token).tolist()]

    def _frame(self, item: VisualItem, f: int) -> FrameGroups | None:
        frame = item.frames[f]
        tokens = frame.shape[0]
        groups = self._groups(item, f)
        sizes = [group.numel() for group in groups]
        budgets = self.crop_budgets(sizes)
        if sum(d + c for d, c in budgets) >= tokens:
            if self.keep is None and all(self.dominant + self.contextual > size for size in sizes):
                where = f"every crop of a {tokens}-token grid" if len(groups) > 1 else f"a {tokens}-token frame"
                warnings.warn(f"VisionZip(dominant={self.dominant}, contextual={self.contextual}) keeps every token of "
                              f"{where}: it reduces nothing; lower the counts or give keep=", UserWarning, stacklevel=2)
            return None
        attention = frame_signal(item, "cls_attention", f, "VisionZip")
        keys = frame_signal(item, "keys", f, "VisionZip") if any(c > 0 for _, c in budgets) else None
        assignment = torch.full((tokens,), -1, dtype=torch.long, device=frame.device)
        outputs, representative = [], []
        offset = 0
        for group, (dominant, contextual) in zip(groups, budgets):
            reduced = dominant_contextual(frame[group], attention[group], None if keys is None else keys[group],
                                          dominant, contextual)
            outputs.append(reduced.tokens)
            representative.append(group[reduced.representative])
            assignment[group] = torch.where(reduced.assignment >= 0, offset + reduced.assignment, -1)
            offset += reduced.tokens.shape[0]
        return FrameGroups(torch.cat(outputs), torch.cat(representative), assignment)


@dataclass
class VisionZip(Method):
    """VisionZip: keep `dominant` patches by CLS attention and merge the rest into `contextual` tokens,
    per image / frame, before the LLM. Counts (paper default 54 + 10) or `keep` (fraction of each frame's
    tokens, split by `contextual_share`, default 10/64). per_crop (default, as published): an anyres
    high-resolution grid is reduced crop by crop, each crop with its own budget. See the module doc."""

    dominant: int | None = None
    contextual: int | None = None
    keep: float | None = None
    contextual_share: float = PAPER_CONTEXTUAL / (PAPER_DOMINANT + PAPER_CONTEXTUAL)
    per_crop: bool = True

    def __post_init__(self) -> None:
        if self.keep is not None:
            if self.dominant is not None or self.contextual is not None:
                raise ValueError(
                    f"give VisionZip either token counts (dominant, contextual) or a fraction (keep), not both; "
                    f"got dominant={self.dominant!r}, contextual={self.contextual!r}, keep={self.keep!r}"
                )
            check_fraction("keep", self.keep)
        else:
            self.dominant = PAPER_DOMINANT if self.dominant is None else _check_count("dominant", self.dominant)
            self.contextual = PAPER_CONTEXTUAL if self.contextual is None else _check_count("contextual", self.contextual)
            if self.dominant + self.contextual == 0:
                raise ValueError("VisionZip needs dominant + contextual >= 1, got 0 + 0")
        check_fraction("contextual_share", self.contextual_share, allow_zero=True)

    def stages(self) -> tuple[Sequence[PreLLMStage], Sequence[LLMStage]]:
        return (DominantContextual(self.dominant, self.contextual, self.keep, self.contextual_share, self.per_crop),), ()

    @classmethod
    def budget_options(cls, keep_fraction: float, num_layers: int) -> dict[str, float]:
        """Visual-token budget -> options: every LLM layer sees the pre-LLM count, so keep = budget."""
        return {"keep": keep_fraction}

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
- LLaVA-NeXT / OneVision anyres images: the adapters hand the stage the base tile and the stitched
  high-resolution grid (all crops, unpadded) as two items, so one budget is ranked over all crops at once;
  the published code reduces each crop separately with its own budget (not done: the crops only exist
  before unpadding, which the adapters leave to the model).
"""

from __future__ import annotations

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


@dataclass
class DominantContextual(PreLLMStage):
    """VisionZip's pre-LLM stage (see the module doc). Either counts (dominant, contextual) or keep."""

    dominant: int | None = PAPER_DOMINANT
    contextual: int | None = PAPER_CONTEXTUAL
    keep: float | None = None
    contextual_share: float = PAPER_CONTEXTUAL / (PAPER_DOMINANT + PAPER_CONTEXTUAL)

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"cls_attention", "keys"})

    def counts(self, tokens: int) -> tuple[int, int]:
        """(dominant, contextual) kept of a frame with `tokens` tokens."""
        if self.keep is None:
            dominant = min(self.dominant, tokens)
            return dominant, min(self.contextual, tokens - dominant)
        total = min(tokens, max(1, round(self.keep * tokens))) if tokens else 0
        contextual = round(total * self.contextual_share)
        return total - contextual, contextual

    def planned_tokens(self, tokens_per_frame: int) -> int:
        return sum(self.counts(tokens_per_frame))

    def reduce(self, item: VisualItem) -> VisualItem:
        results = [self._frame(item, f) for f in range(len(item.frames))]
        if all(r is None for r in results):
            return item
        return rebuild(item, [FrameGroups.identity(frame) if r is None else r for frame, r in zip(item.frames, results)])

    def _frame(self, item: VisualItem, f: int) -> FrameGroups | None:
        frame = item.frames[f]
        tokens = frame.shape[0]
        dominant, contextual = self.counts(tokens)
        if dominant + contextual >= tokens:
            if self.keep is None and self.dominant + self.contextual > tokens:
                warnings.warn(f"VisionZip(dominant={self.dominant}, contextual={self.contextual}) keeps every token of "
                              f"a {tokens}-token frame: it reduces nothing; lower the counts or give keep=",
                              UserWarning, stacklevel=2)
            return None
        device = frame.device
        attention = frame_signal(item, "cls_attention", f, "VisionZip").float()
        order = torch.sort(attention, descending=True, stable=True).indices  # ties: earlier patch first
        is_dominant = torch.zeros(tokens, dtype=torch.bool, device=device)
        is_dominant[order[:dominant]] = True
        assignment = torch.full((tokens,), -1, dtype=torch.long, device=device)
        dominant_idx = is_dominant.nonzero().squeeze(1)
        assignment[dominant_idx] = torch.arange(dominant, device=device)
        representative = [dominant_idx]
        outputs = [frame[dominant_idx]]
        if contextual > 0:
            rest = (~is_dominant).nonzero().squeeze(1)  # raster order
            step = max(1, rest.numel() // contextual)
            targets = rest[torch.arange(0, rest.numel(), step, device=device)[:contextual]]
            is_target = torch.zeros(tokens, dtype=torch.bool, device=device)
            is_target[targets] = True
            others = rest[~is_target[rest]]
            keys = frame_signal(item, "keys", f, "VisionZip").float()
            keys = keys / torch.linalg.vector_norm(keys, dim=-1, keepdim=True).clamp(min=1e-12)
            nearest = (keys[others] @ keys[targets].T).argmax(dim=1)  # ties: the earlier target
            assignment[targets] = dominant + torch.arange(contextual, device=device)
            assignment[others] = dominant + nearest
            joined = torch.bincount(nearest, minlength=contextual).clamp(min=1)  # [contextual]
            weights = torch.zeros(contextual, tokens, dtype=torch.float32, device=device)  # target + mean(joined)
            weights[torch.arange(contextual, device=device), targets] = 1.0
            weights[nearest, others] = 1.0 / joined[nearest].float()
            outputs.append((weights @ frame.float()).to(frame.dtype))
            representative.append(targets)
        return FrameGroups(torch.cat(outputs), torch.cat(representative), assignment)


@dataclass
class VisionZip(Method):
    """VisionZip: keep `dominant` patches by CLS attention and merge the rest into `contextual` tokens,
    per image / frame, before the LLM. Counts (paper default 54 + 10) or `keep` (fraction of each frame's
    tokens, split by `contextual_share`, default 10/64). See the module doc for deviations."""

    dominant: int | None = None
    contextual: int | None = None
    keep: float | None = None
    contextual_share: float = PAPER_CONTEXTUAL / (PAPER_DOMINANT + PAPER_CONTEXTUAL)

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
        return (DominantContextual(self.dominant, self.contextual, self.keep, self.contextual_share),), ()

    @classmethod
    def budget_options(cls, keep_fraction: float, num_layers: int) -> dict[str, float]:
        """Visual-token budget -> options: every LLM layer sees the pre-LLM count, so keep = budget."""
        return {"keep": keep_fraction}

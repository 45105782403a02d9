"""VisPruner (Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token
Pruning in VLMs", ICCV 2025, arXiv 2412.01818), before the LLM, per image / video frame:

A frame of T tokens keeps K = max(1, round(keep * T)) of them:
1. Important tokens: the floor(K * important) patches the vision CLS token attends to most (the vision layer
   the projector reads, head-averaged; `models.vision`'s "cls_attention").
2. Diverse tokens: the other K - that many come from the remaining patches, taken in descending CLS
   attention, by iterative duplicate removal (`ops.diversity.remove_duplicates`): split the remaining
   tokens alternately into A and B, drop the (up to `step` = 8) A tokens most cosine-similar to some B token,
   repeat until the count is reached.
Kept tokens stay in raster order; the others are dropped (no merging).

Defaults: important = 0.5 (the README's example, e.g. 64 important + 64 diverse tokens), step = 8 (the
code's per-round removal); keep = 64 / 576, the paper's most reported LLaVA-1.5 setting.

Deviations from the published code (read for facts only, not copied):
- Similarity of the diverse step is computed on the projector outputs (the code uses the vision tower's
  features before the projector, an MLP away).
- A round removes at most |A| tokens (the code's index arithmetic assumes an even remainder and more than
  2 * step tokens left); ties in the CLS ranking go to the earlier patch (the code's sort is unstable).
- The count is per image / video frame; towers without CLS (SigLIP, Qwen2-VL) rank by the mean token's
  attention instead (`models.vision`'s substitute).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from leanvlm.methods._frames import frame_signal
from leanvlm.methods.base import LLMStage, Method, PreLLMStage, check_fraction
from leanvlm.methods.divprune import frame_keep_count
from leanvlm.ops.diversity import remove_duplicates
from leanvlm.runtime.visual import VisualItem

PAPER_KEEP = 64 / 576
PAPER_IMPORTANT = 0.5
PAPER_STEP = 8


@dataclass
class ImportantDiverse(PreLLMStage):
    """VisPruner's pre-LLM stage (see the module doc)."""

    keep: float = PAPER_KEEP
    important: float = PAPER_IMPORTANT
    step: int = PAPER_STEP

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"cls_attention"})

    def planned_tokens(self, tokens_per_frame: int) -> int:
        return frame_keep_count(self.keep, tokens_per_frame)

    def select(self, frame: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """Kept positions of one frame, ascending. frame [T, C] tokens, attention [T] CLS attention -> [K] long."""
        total = frame_keep_count(self.keep, frame.shape[0])
        important = int(total * self.important)
        order = torch.sort(attention.float(), descending=True, stable=True).indices  # [T]
        rest = order[important:]
        diverse = rest[remove_duplicates(frame[rest], total - important, self.step)]
        return torch.sort(torch.cat([order[:important], diverse])).values

    def reduce(self, item: VisualItem) -> VisualItem:
        if self.keep == 1.0:
            return item
        keep = [self.select(frame, frame_signal(item, "cls_attention", f, "VisPruner"))
                for f, frame in enumerate(item.frames)]
        return item.select(keep)


@dataclass
class VisPruner(Method):
    """VisPruner: per image / frame keep `keep` of the visual tokens, the share `important` by vision CLS
    attention and the rest by removing duplicates, before the LLM. See the module doc for deviations."""

    keep: float = PAPER_KEEP
    important: float = PAPER_IMPORTANT
    step: int = PAPER_STEP

    def __post_init__(self) -> None:
        check_fraction("keep", self.keep)
        check_fraction("important", self.important, allow_zero=True)
        if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 1:
            raise ValueError(f"step must be an int >= 1, got {self.step!r}")

    def stages(self) -> tuple[Sequence[PreLLMStage], Sequence[LLMStage]]:
        return (ImportantDiverse(self.keep, self.important, self.step),), ()

    @classmethod
    def budget_options(cls, keep_fraction: float, num_layers: int) -> dict[str, float]:
        """Visual-token budget -> keep = budget (every LLM layer sees the pre-LLM count)."""
        return {"keep": keep_fraction}

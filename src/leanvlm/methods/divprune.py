"""DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models",
CVPR 2025, arXiv 2503.02175), before the LLM, per image / video frame:

Keep K = max(1, round(keep * T)) of a frame's T visual tokens chosen as a max-min diverse subset
(`ops.diversity.max_min_diverse`): with d(i, j) = 1 - cos(x_i, x_j) over the projector outputs x (the LLM
input embeddings of the visual tokens), the first token is the one farthest from its nearest neighbour,
each next one the token farthest from the tokens picked so far. Kept tokens stay in raster order; the
others are dropped (no merging). No vision-tower signal is needed, so every supported family runs it.

Defaults: keep = 0.098, the published code's default retained ratio (LLaVA-1.5: 56 of 576 tokens).

Deviations from the published code (read for facts only, CC BY-NC; not copied):
- The first pick takes the nearest OTHER token's distance (the code takes the second smallest entry of
  the token's distance column, which is the same unless float rounding makes a duplicate token's
  distance smaller than the token's distance to itself).
- The count is per image / video frame (the code prunes each image's feature block of LLaVA-1.5; for
  anyres / multi-frame inputs it prunes the concatenated features as one set).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from leanvlm.methods.base import LLMStage, Method, PreLLMStage, check_fraction
from leanvlm.ops.diversity import max_min_diverse
from leanvlm.runtime.visual import VisualItem

#: The published code's default retained ratio.
PAPER_KEEP = 0.098


def frame_keep_count(keep: float, tokens: int) -> int:
    """Tokens a frame of `tokens` keeps: max(1, round(keep * tokens)), never more than it has."""
    return min(tokens, max(1, round(keep * tokens))) if tokens else 0


@dataclass
class DiverseSubset(PreLLMStage):
    """DivPrune's pre-LLM stage: keep a max-min diverse `keep` of every frame's tokens."""

    keep: float = PAPER_KEEP

    def planned_tokens(self, tokens_per_frame: int) -> int:
        return frame_keep_count(self.keep, tokens_per_frame)

    def reduce(self, item: VisualItem) -> VisualItem:
        if self.keep == 1.0:
            return item
        keep = [torch.sort(max_min_diverse(frame, frame_keep_count(self.keep, frame.shape[0]))).values
                for frame in item.frames]
        return item.select(keep)


@dataclass
class DivPrune(Method):
    """DivPrune: keep a max-min diverse fraction `keep` (default 0.098) of every image / frame's visual
    tokens, before the LLM. See the module doc for the algorithm and deviations."""

    keep: float = PAPER_KEEP

    def __post_init__(self) -> None:
        check_fraction("keep", self.keep)

    def stages(self) -> tuple[Sequence[PreLLMStage], Sequence[LLMStage]]:
        return (DiverseSubset(self.keep),), ()

    @classmethod
    def budget_options(cls, keep_fraction: float, num_layers: int) -> dict[str, float]:
        """Visual-token budget -> keep = budget (every LLM layer sees the pre-LLM count)."""
        return {"keep": keep_fraction}

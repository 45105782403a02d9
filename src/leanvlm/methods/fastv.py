"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024, arXiv 2403.06764).

After decoder layer K, keep the fraction R of the visual tokens that receive the most attention from the
last token (head-averaged) and drop the rest for all later layers. Paper default for LLaVA-1.5: K=2, R=50%.

Deviation / convention: layers are 0-indexed and a stage at layer K scores with layer K's own attention,
so layers 0..K see every token and layers > K see the kept ones (the paper's code scores with the layer
before the first pruned one; with K=2 it prunes from layer 2 on, one layer earlier than here).
The attention row is recomputed from layer K's q/k for the last query only, so sdpa/flash models work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from leanvlm.methods.base import LLMStage, Method, PreLLMStage, Selection, check_fraction, keep_count
from leanvlm.runtime.context import LayerContext


@dataclass
class LastTokenAttentionDrop(LLMStage):
    """Keep `keep` of the visual tokens after `layer`, ranked by the last token's attention to them."""

    layer: int
    keep: float

    def layers(self, num_layers: int) -> list[int]:
        return [self.layer]

    def select(self, ctx: LayerContext) -> Selection:
        scores = ctx.attention_from(ctx.last_slot)  # [B, N]
        candidates = ctx.visual
        return Selection(scores, candidates, keep_count(self.keep, candidates.sum(dim=1)))

    def planned_keep(self, layer: int, num_layers: int, visual_into_llm: int, visual_now: int) -> int:
        return max(1, round(self.keep * visual_now)) if visual_now else 0


@dataclass
class FastV(Method):
    """FastV: after decoder layer `layer` (0-indexed), keep the fraction `keep` of the visual tokens."""

    layer: int = 2
    keep: float = 0.5

    def __post_init__(self) -> None:
        check_fraction("keep", self.keep)
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"layer must be a decoder layer index >= 0, got {self.layer!r}")

    def stages(self) -> tuple[Sequence[PreLLMStage], Sequence[LLMStage]]:
        return (), (LastTokenAttentionDrop(self.layer, self.keep),)

"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024, arXiv 2403.06764).

After decoder layer `layer`, keep the fraction `keep` of the visual tokens that receive the most attention
from the last token (head-averaged) and drop the rest for all later layers. The paper's knobs are K (the
layer after which tokens are pruned, 1-indexed) and R (the fraction of the visual tokens PRUNED); its
LLaVA-1.5 default is K=2, R=50%, which is `FastV(layer=1, keep=0.5)` here (keep = 1 - R).

Convention: layers are 0-indexed and a stage at `layer` scores with that layer's own attention, so layers
0..layer see every token and layers > layer see the kept ones. The paper's K=2 (its code scores with the
attention of the second decoder layer, 0-indexed layer 1, and prunes from the third on) is our `layer=1`,
the default; `layer=2` corresponds to the code's K=3.
The attention row is recomputed from the layer's q/k for the last query only, so sdpa/flash models work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from leanvlm.methods.base import LLMStage, Method, PreLLMStage, Selection, check_fraction, keep_count
from leanvlm.runtime.context import LayerContext

#: The paper's K=2 in our 0-indexed convention.
PAPER_LAYER = 1


def single_drop_budget(name: str, keep_fraction: float, num_layers: int, layer: int) -> dict[str, float | int]:
    """(layer, keep) for a method that drops visual tokens once, after `layer`, so that the mean over the LLM's
    layers of the visual tokens computed on is `keep_fraction` of the input: layers 0..layer see all of them
    and the rest keep R, R = (b L - (layer + 1)) / (L - layer - 1). `layer` is lowered (down to 0) when b is
    too small for it; ValueError when even layer 0 costs more than b."""
    for candidate in range(layer, -1, -1):
        if candidate > num_layers - 2:
            continue
        full = candidate + 1
        keep = (keep_fraction * num_layers - full) / (num_layers - full)
        if keep > 0:
            return {"layer": candidate, "keep": min(1.0, keep)}
    raise ValueError(
        f"{name} cannot reach a visual-token budget of {keep_fraction:.4g} on {num_layers} layers "
        f"(layer 0 alone costs {1 / num_layers:.4g}; {name} needs at least 2 layers)"
    )


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
    """FastV: after decoder layer `layer` (0-indexed; default 1 = the paper's K=2), keep the fraction `keep`
    (= 1 - the paper's R) of the visual tokens."""

    layer: int = PAPER_LAYER
    keep: float = 0.5

    def __post_init__(self) -> None:
        check_fraction("keep", self.keep)
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"layer must be a decoder layer index >= 0, got {self.layer!r}")

    def stages(self) -> tuple[Sequence[PreLLMStage], Sequence[LLMStage]]:
        return (), (LastTokenAttentionDrop(self.layer, self.keep),)

    @classmethod
    def budget_options(cls, keep_fraction: float, num_layers: int) -> dict[str, float | int]:
        """Visual-token budget -> (layer, keep) at the paper's layer (lowered to 0 for tiny budgets)."""
        return single_drop_budget("FastV", keep_fraction, num_layers, PAPER_LAYER)

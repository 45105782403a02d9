"""PyramidDrop (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid
Visual Redundancy Reduction", arXiv 2410.17247), inside the LLM.

The decoder is split into stages; after each stage's last layer the visual tokens are ranked by the
attention the last instruction token (the prompt's last token) pays them at that layer, head-averaged,
and only the top ones continue. Several drops make a pyramid: every stage computes on fewer visual tokens.

Ratios (SPEC 3): `ratios[i]` is the fraction of the PREVIOUS count kept after `layers[i]`
(`of="previous"`, default), so the defaults (0.5, 0.25, 0.125) keep 50%, then 12.5%, then 1.6% of the
visual tokens that entered the LLM. The paper's setting keeps 50%, 25%, 12.5% of the ORIGINAL count
(lambda = 0.5 per stage); reproduce it with `ratios=(0.5, 0.5, 0.5)` or `of="original"` with the default
ratios. Counts round half to even, at least 1 (the paper's code floors).

Layers (0-indexed; a drop at layer l scores with layer l's attention, computed from l's own q/k on its
input, and layers > l see the kept tokens): `layers=None` (default) takes the paper's [8, 16, 24] of a
32-layer LLM and scales it to the model's depth L: layer_i = floor(i L / (n + 1) + 1/2) for the n =
len(ratios) stages, capped at L - 2 (so every drop leaves at least one layer), which is exactly
[8, 16, 24] for L = 32, [7, 14, 21] for 28 and [2, 3, 4] for 6; an error if the depth cannot hold n
distinct drop layers. Explicit `layers` must be strictly increasing and below the model's depth (checked
with a clear ValueError when the method is applied).

Deviation: the paper's code drops BEFORE layer 8 using layer 8's q/k on layer 8's input; here the same
scores are used but the drop happens after layer 8, so each stage boundary layer still computes on the
previous stage's tokens (one layer later than the paper; pass [7, 15, 23] for the paper's token counts per
layer, scored one layer earlier). Surviving tokens keep their original RoPE positions (the code re-numbers
positions contiguously after each drop). The attention row is recomputed from q/k, so sdpa/flash models work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from leanvlm import flops as flops_model
from leanvlm.methods.base import LLMStage, Method, PreLLMStage, Selection, check_fraction, keep_count
from leanvlm.runtime.context import LayerContext

RatioBase = Literal["previous", "original"]
PAPER_LAYERS = (8, 16, 24)
PAPER_DEPTH = 32


def scaled_layers(num_layers: int, stages: int) -> list[int]:
    """Default drop layers for a depth: floor(i L / (n + 1) + 1/2), i = 1..n, capped at L - 2.

    32 layers and 3 stages -> [8, 16, 24] (the paper's). ValueError if the depth cannot hold n distinct layers.
    """
    layers = [min(num_layers - 2, math.floor(i * num_layers / (stages + 1) + 0.5)) for i in range(1, stages + 1)]
    if num_layers < stages + 1 or any(b <= a for a, b in zip(layers, layers[1:])) or layers[0] < 0:
        raise ValueError(
            f"PyramidDrop: a {num_layers}-layer LLM cannot hold {stages} drop stages (scaled layers {layers}); "
            f"pass fewer ratios or explicit layers"
        )
    return layers


@dataclass
class PyramidStages(LLMStage):
    """Drop after each of `layers` (None: `scaled_layers`), keeping ratios[i] of the previous (or of the
    original) visual count, ranked by the last token's head-averaged attention at that layer."""

    layer_list: tuple[int, ...] | None
    ratios: tuple[float, ...]
    of: RatioBase = "previous"

    def resolve(self, num_layers: int) -> list[int]:
        if self.layer_list is None:
            return scaled_layers(num_layers, len(self.ratios))
        layers = list(self.layer_list)
        if layers[-1] >= num_layers:
            raise ValueError(
                f"PyramidDrop layers {layers} do not fit this {num_layers}-layer LLM (drop layers must be in "
                f"[0, {num_layers - 1}]); pass layers=None to scale the paper's {list(PAPER_LAYERS)} of "
                f"{PAPER_DEPTH} layers to this depth, or give smaller layers"
            )
        return layers

    def layers(self, num_layers: int) -> list[int]:
        return self.resolve(num_layers)

    def _ratio(self, layer: int, num_layers: int) -> float:
        return self.ratios[self.resolve(num_layers).index(layer)]

    def select(self, ctx: LayerContext) -> Selection:
        batch, length = ctx.index.shape
        candidates = ctx.visual
        available = candidates.sum(dim=1)
        ratio = self._ratio(ctx.layer, ctx.num_layers)
        base = available if self.of == "previous" else ctx.visual_into_llm.to(available.device)
        keep = torch.minimum(keep_count(ratio, base), available)
        if bool((keep >= available).all()):
            return Selection(torch.zeros(candidates.shape, device=candidates.device), candidates, keep)
        last = torch.full((batch, 1), length - 1, dtype=torch.long, device=ctx.index.device)
        return Selection(ctx.attention_from(last), candidates, keep)

    def planned_keep(self, layer: int, num_layers: int, visual_into_llm: int, visual_now: int) -> int:
        ratio = self._ratio(layer, num_layers)
        base = visual_now if self.of == "previous" else visual_into_llm
        return min(visual_now, flops_model.kept_count(base, ratio))


@dataclass
class PyramidDrop(Method):
    """PyramidDrop: after each of `layers` keep `ratios[i]` of the visual tokens (of the previous count by
    default, SPEC 3), ranked by the last instruction token's attention. layers=None scales the paper's
    [8, 16, 24] (of 32 layers) to the model's depth. See the module doc for deviations."""

    layers: Sequence[int] | None = None
    ratios: Sequence[float] = (0.5, 0.25, 0.125)
    of: RatioBase = "previous"

    def __post_init__(self) -> None:
        if isinstance(self.ratios, (str, bytes)) or not isinstance(self.ratios, Sequence) or not self.ratios:
            raise ValueError(f"ratios must be a non-empty sequence of fractions in (0, 1], got {self.ratios!r}")
        self.ratios = tuple(check_fraction("ratios[]", r) for r in self.ratios)
        if self.of not in ("previous", "original"):
            raise ValueError(f"of must be 'previous' or 'original', got {self.of!r}")
        if self.of == "original" and any(b > a for a, b in zip(self.ratios, self.ratios[1:])):
            raise ValueError(f"with of='original' the ratios must not increase (dropped tokens cannot come back), got {list(self.ratios)}")
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, Sequence):
                raise ValueError(f"layers must be a sequence of decoder layer indices or None, got {self.layers!r}")
            layers = tuple(self.layers)
            if any(isinstance(l, bool) or not isinstance(l, int) or l < 0 for l in layers):
                raise ValueError(f"layers must be int decoder layer indices >= 0, got {list(layers)}")
            if any(b <= a for a, b in zip(layers, layers[1:])):
                raise ValueError(f"layers must be strictly increasing, got {list(layers)}")
            if len(layers) != len(self.ratios):
                raise ValueError(f"need one ratio per drop layer, got layers {list(layers)} and ratios {list(self.ratios)}")
            self.layers = layers

    def stages(self) -> tuple[Sequence[PreLLMStage], Sequence[LLMStage]]:
        return (), (PyramidStages(self.layers, self.ratios, self.of),)

    def resolved_layers(self, num_layers: int) -> list[int]:
        """The drop layers on a model of this depth (validated)."""
        return PyramidStages(self.layers, self.ratios, self.of).resolve(num_layers)

    @classmethod
    def budget_options(cls, keep_fraction: float, num_layers: int) -> dict[str, object]:
        """Visual-token budget -> drop layers l_1 < l_2 < l_3 and one ratio lambda per stage (of the previous
        count) such that the mean over layers of the visual fraction,
        [(l_1 + 1) + (l_2 - l_1) lambda + (l_3 - l_2) lambda^2 + (L - 1 - l_3) lambda^3] / L,
        equals the budget (bisection; the paper's own schedule is lambda = 0.5 at [8, 16, 24]).
        Layers: the depth-scaled defaults; when the budget is at or below what their first stage alone
        costs, (l_1 + 1) / L, the first drop moves earlier, l_1 = default - 1 down to 0, with stages
        l_1 + i max(1, l_1). ValueError when even [0, 1, 2] cannot reach it."""
        check_fraction("keep_fraction", keep_fraction)
        stages = len(PAPER_LAYERS)
        default = scaled_layers(num_layers, stages)
        options = [default] + [[first + i * max(1, first) for i in range(stages)] for first in range(default[0] - 1, -1, -1)]
        options = [layers for layers in options if layers[-1] <= num_layers - 2]
        layers = next((layers for layers in options if (layers[0] + 1) / num_layers < keep_fraction), None)
        if layers is None:
            raise ValueError(
                f"PyramidDrop cannot reach a visual-token budget of {keep_fraction:.4g} on {num_layers} layers: "
                f"even dropping after layers {options[-1]} costs more than that"
            )
        spans = [b - a for a, b in zip([-1, *layers], [*layers, num_layers - 1])]  # layers at each visual fraction

        def budget(lam: float) -> float:
            return sum(span * lam**i for i, span in enumerate(spans)) / num_layers

        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if budget(mid) < keep_fraction else (lo, mid)
        ratio = 1.0 if keep_fraction >= 1.0 else round(hi, 12)
        return {"layers": tuple(layers), "ratios": (ratio,) * stages}

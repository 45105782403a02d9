"""RandomDrop: a seeded random selection of visual tokens before the LLM (a sanity baseline, SPEC 3).

Each image / video frame of T tokens keeps max(1, round(keep * T)) of them, drawn uniformly without
replacement and kept in raster order (`ops.sample.seeded_subset`). Deterministic: frame f of an item draws
with seed `seed + 1_000_003 * f`, so the choice depends only on (seed, frame index, T): the same on any
device, in any batch, whatever the global RNG state (which is never touched). Two images with the same
token count get the same positions (use another seed per run to average over draws).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from leanvlm.methods.base import LLMStage, Method, PreLLMStage, check_fraction
from leanvlm.ops.sample import seeded_subset
from leanvlm.runtime.visual import VisualItem

_FRAME_STRIDE = 1_000_003


@dataclass
class RandomSelect(PreLLMStage):
    """Keep a seeded random `keep` of every frame's tokens."""

    keep: float = 0.25
    seed: int = 0

    def count(self, tokens: int) -> int:
        return min(tokens, max(1, round(self.keep * tokens))) if tokens else 0

    def planned_tokens(self, tokens_per_frame: int) -> int:
        return self.count(tokens_per_frame)

    def reduce(self, item: VisualItem) -> VisualItem:
        if self.keep == 1.0:
            return item
        keep = [seeded_subset(f.shape[0], self.count(f.shape[0]), (self.seed + _FRAME_STRIDE * i) % 2**63, f.device)
                for i, f in enumerate(item.frames)]
        return item.select(keep)


@dataclass
class RandomDrop(Method):
    """Keep a seeded random `keep` (default 0.25) of the visual tokens of every image / frame, before the LLM."""

    keep: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        check_fraction("keep", self.keep)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")

    def stages(self) -> tuple[Sequence[PreLLMStage], Sequence[LLMStage]]:
        return (RandomSelect(self.keep, self.seed),), ()

    @classmethod
    def budget_options(cls, keep_fraction: float, num_layers: int) -> dict[str, float]:
        """Visual-token budget -> keep = budget (every LLM layer sees the pre-LLM count)."""
        return {"keep": keep_fraction}

"""What a method did on the last prompt: tokens per stage and per layer, analytic FLOPs, time spent."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from leanvlm.flops import LLMShape, llm_prefill_flops

if TYPE_CHECKING:
    from leanvlm.models.base import ModelAdapter
    from leanvlm.runtime.context import TokenLayout
    from leanvlm.runtime.visual import VisualItem


@dataclass
class SampleStats:
    """One sample of the batch. Token counts exclude padding."""

    visual_in: int  # visual tokens out of the projector
    visual_into_llm: int  # after the pre-LLM stages
    layer_tokens: list[int]  # tokens each decoder layer computed on
    layer_visual_tokens: list[int]  # of which visual
    base_flops: float  # analytic LLM prefill FLOPs of the plain model on this sample
    method_flops: float  # the same with the method
    details: dict[str, list[Any]] = field(default_factory=dict)  # stage reports, one entry per image/video

    @property
    def flops_ratio(self) -> float:
        """base / method (how many times cheaper the prefill is)."""
        return self.base_flops / self.method_flops

    @property
    def token_fraction(self) -> float:
        """Tokens processed, averaged over layers, as a fraction of the plain model's (ITP's "22%" measure)."""
        full = self.layer_tokens[0] + self.visual_in - self.visual_into_llm
        return sum(self.layer_tokens) / (full * len(self.layer_tokens))


@dataclass
class ReductionStats:
    """Filled after every prompt (prefill) a method sees; decode steps only add to `reduction_seconds`."""

    samples: list[SampleStats]
    reduction_seconds: float
    notes: list[str] = field(default_factory=list)
    #: the reduced images/videos of the prompt (pre-LLM stages only), for visualisation
    visual_items: list[VisualItem] = field(default_factory=list, repr=False)
    #: per sample: for every visual token that entered the LLM (sequence order), how many decoder layers
    #: computed on it (the model's depth if no in-LLM stage dropped it), for visualisation
    visual_depth: list[list[int]] = field(default_factory=list, repr=False)

    @property
    def flops_ratio(self) -> float:
        return sum(s.base_flops for s in self.samples) / sum(s.method_flops for s in self.samples)

    @property
    def token_fraction(self) -> float:
        """Mean over samples of SampleStats.token_fraction."""
        return sum(s.token_fraction for s in self.samples) / len(self.samples)

    @property
    def mean_visual_into_llm(self) -> float:
        return sum(s.visual_into_llm for s in self.samples) / len(self.samples)

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": [asdict(s) | {"flops_ratio": s.flops_ratio, "token_fraction": s.token_fraction} for s in self.samples],
            "token_fraction": self.token_fraction,
            "reduction_seconds": self.reduction_seconds,
            "flops_ratio": self.flops_ratio,
            "mean_visual_into_llm": self.mean_visual_into_llm,
            "notes": list(self.notes),
        }


def build_stats(
    adapter: ModelAdapter,
    layout: TokenLayout,
    visual_in: torch.Tensor | None,
    layer_tokens: list[torch.Tensor],
    layer_visual: list[torch.Tensor],
    seconds: float,
    visual_items: list[VisualItem],
) -> ReductionStats:
    """Assemble per-sample stats from the per-layer [B] counts the runtime recorded during prefill."""
    shape = LLMShape.from_config(adapter.model.config)
    into_llm = layout.visual.sum(dim=1)
    visual_in = into_llm if visual_in is None else visual_in
    tokens = torch.stack(layer_tokens, dim=1).tolist()  # [B, L]
    visual = torch.stack(layer_visual, dim=1).tolist()
    details: list[dict[str, list[Any]]] = [{} for _ in tokens]
    for item in visual_items:
        for key, value in item.info.items():
            details[item.sample].setdefault(key, []).append(value)
    samples = []
    for b in range(len(tokens)):
        removed_before = int(visual_in[b]) - int(into_llm[b])
        base = [tokens[b][0] + removed_before] * len(tokens[b])
        samples.append(SampleStats(
            visual_in=int(visual_in[b]), visual_into_llm=int(into_llm[b]), layer_tokens=tokens[b],
            layer_visual_tokens=visual[b], base_flops=llm_prefill_flops(base, shape),
            method_flops=llm_prefill_flops(tokens[b], shape), details=details[b],
        ))
    notes = []
    if int(into_llm.sum()) == 0 and int(visual_in.sum()) == 0:
        notes.append("no visual tokens in the input: ran unchanged")
    return ReductionStats(samples, seconds, notes, visual_items)


def visual_depth(visual: torch.Tensor, decisions: dict[int, torch.Tensor], num_layers: int) -> list[list[int]]:
    """Per sample, the number of decoder layers that computed on each of its visual tokens (sequence order).

    visual [B, N0] bool: visual tokens of the LLM input. decisions: drop layer -> [B, K] positions (in the
    LLM input) of the tokens kept after that layer, -1 = filler (`runtime.engine.Session.decisions`).
    A token missing from decisions[l] was computed on by layers 0..l, so its depth is l + 1.
    """
    batch, length = visual.shape
    depth = torch.full((batch, length), num_layers, dtype=torch.long)
    for layer in sorted(decisions, reverse=True):  # the earliest layer that lost a token wins
        kept = decisions[layer].cpu()
        alive = torch.zeros(batch, length + 1, dtype=torch.bool)
        alive.scatter_(1, torch.where(kept >= 0, kept, length), True)
        depth[~alive[:, :length]] = layer + 1
    return [depth[b][visual[b].cpu()].tolist() for b in range(batch)]

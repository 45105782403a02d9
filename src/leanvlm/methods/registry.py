"""Methods by name (for the CLI and sweeps), and a common visual-token budget mapped to each method's knobs.

    make_method("visionzip", keep=0.25)
    make_method("pyramiddrop", **budget_options("pyramiddrop", 0.25, num_layers=32))

Adding a method is one line in `METHODS`; if its class has a classmethod
`budget_options(keep_fraction, num_layers) -> dict`, `budget_options` uses it (AIM predates that hook, so its
mapping lives here in `_BUDGETS`).

The common budget is the fraction of the visual tokens (as they come out of the projector) that the LLM
processes, averaged over its decoder layers: mean_l V_l / V_in, where V_l counts the visual tokens layer l
computes on (`SampleStats.layer_visual_tokens`, measured by `visual_budget`). How each method maps a budget b
(L = decoder layers; counts round per frame / per layer, so the realised budget is within rounding of b):
- visionzip, random, pool, divprune, cdpruner, vispruner, fastvid: every layer sees the pre-LLM count, so
  keep = b (pool's grid rounding is coarser, see `Pool`).
- holitom: layers 0..l (its default inner-merge layer) see keep * V and the rest inner_keep of that: keep
  = b L / (l + 1 + (L - l - 1) / 2) at the published inner_keep 0.5, or keep = 1 and the inner_keep that
  reaches b when that exceeds 1 (see `HoliTom.budget_options`).
- prumerge, prumerge+: the fixed-budget variant keep = b (the paper's adaptive IQR count has no knob).
- fastv, dart: layers 0..K see everything and the rest keep R, so R = (b L - (K + 1)) / (L - K - 1) at the
  default K = 1 (the papers' K = 2; lowered to 0 when b is too small for it; ValueError below 1 / L;
  `fastv.single_drop_budget`).
- pyramiddrop: one ratio lambda per stage (of the previous count) at the depth-scaled default layers, solved
  so the layer mean equals b (see `PyramidDrop.budget_options`).
- itp: none: its stage 1 keeps an input-dependent count (the knee), so a sweep runs it at its own options
  and reports the budget it reached.
- aim: the SPEC's (video) default l1 / l2 for the depth, passed explicitly; P = the mean over layers of the
  progressive-prune fraction (runtime accounting: layers 0..l1 see all, layer l sees keep(l - 1));
  merge_keep = b / P with pruning when b <= P, else merge_keep = b without pruning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from leanvlm.methods.aim import AIM
from leanvlm.methods.base import Method, check_fraction, check_option_types
from leanvlm.methods.cdpruner import CDPruner
from leanvlm.methods.dart import DART
from leanvlm.methods.divprune import DivPrune
from leanvlm.methods.fastv import FastV
from leanvlm.methods.fastvid import FastVID
from leanvlm.methods.holitom import HoliTom
from leanvlm.methods.itp import ITP
from leanvlm.methods.pool import Pool
from leanvlm.methods.prumerge import PruMerge, PruMergePlus
from leanvlm.methods.pyramiddrop import PyramidDrop
from leanvlm.methods.randomdrop import RandomDrop
from leanvlm.methods.visionzip import VisionZip
from leanvlm.methods.vispruner import VisPruner
from leanvlm.ops.schedule import default_prune_layers, progressive_keep
from leanvlm.stats import SampleStats

#: CLI name -> method class. Add a method with one line here.
METHODS: dict[str, type[Method]] = {
    "fastv": FastV,
    "aim": AIM,
    "itp": ITP,
    "visionzip": VisionZip,
    "prumerge": PruMerge,
    "prumerge+": PruMergePlus,
    "pyramiddrop": PyramidDrop,
    "random": RandomDrop,
    "pool": Pool,
    "divprune": DivPrune,
    "cdpruner": CDPruner,
    "vispruner": VisPruner,
    "dart": DART,
    "holitom": HoliTom,
    "fastvid": FastVID,
}


def _lookup(name: str) -> type[Method]:
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return METHODS[key]


def make_method(name: str, **options: Any) -> Method:
    """A method by registry name (case-insensitive), with its constructor options.

    ValueError listing the known names for an unknown method, and listing the method's options for an
    unknown option; the constructor's own ValueErrors for bad values.
    """
    cls = _lookup(name)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"{name!r} has no option(s) {', '.join(unknown)}; its options: {', '.join(known)}")
    method = cls(**options)
    check_option_types(method)
    return method


def _num_layers(model_or_layers: Any) -> int:
    if isinstance(model_or_layers, bool):
        raise ValueError(f"num_layers must be a positive int or a model / config, got {model_or_layers!r}")
    if isinstance(model_or_layers, int):
        layers = model_or_layers
    else:
        from leanvlm.flops import LLMShape

        layers = LLMShape.from_config(getattr(model_or_layers, "config", model_or_layers)).layers
    if layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {layers}")
    return layers


def _aim_prune_mean(num_layers: int) -> float:
    l1, l2 = default_prune_layers(num_layers, "video")
    fractions = [1.0 if layer <= l1 else progressive_keep(layer - 1, l1, l2) for layer in range(num_layers)]
    return sum(fractions) / num_layers


def _aim_budget(keep_fraction: float, num_layers: int) -> dict[str, Any]:
    # the SPEC's (video) window, named explicitly: AIM's image default prunes later, and the mean above is
    # this window's
    prune_mean = _aim_prune_mean(num_layers)
    if keep_fraction <= prune_mean:
        l1, l2 = default_prune_layers(num_layers, "video")
        return {"merge_keep": keep_fraction / prune_mean, "prune": True, "l1": l1, "l2": l2}
    return {"merge_keep": keep_fraction, "prune": False}


_BUDGETS: dict[str, Callable[[float, int], dict[str, Any]]] = {"aim": _aim_budget}


def has_budget_mapping(name: str) -> bool:
    """Whether `budget_options` can configure method `name` (ITP cannot: its cut is input-dependent)."""
    return name.strip().lower() in _BUDGETS or getattr(_lookup(name), "budget_options", None) is not None


def budget_options(name: str, keep_fraction: float, num_layers: Any) -> dict[str, Any]:
    """Options that make method `name` process about `keep_fraction` of the visual tokens, averaged over
    the LLM's decoder layers (see the module doc for each mapping). num_layers: the LLM depth, or a model /
    config to read it from. Pass the result to `make_method(name, **options)`."""
    cls = _lookup(name)
    check_fraction("keep_fraction", keep_fraction)
    layers = _num_layers(num_layers)
    key = name.strip().lower()
    if key in _BUDGETS:
        return _BUDGETS[key](keep_fraction, layers)
    mapping = getattr(cls, "budget_options", None)
    if mapping is None:
        raise ValueError(f"method {name!r} has no budget mapping; give its options explicitly")
    return mapping(keep_fraction, layers)


def method_for_budget(name: str, keep_fraction: float, num_layers: Any, **options: Any) -> Method:
    """`make_method(name, **budget_options(name, keep_fraction, num_layers), **options)`."""
    return make_method(name, **{**budget_options(name, keep_fraction, num_layers), **options})


def visual_budget(sample: SampleStats) -> float:
    """The realised budget of one sample: mean over layers of its visual tokens / the projector's count."""
    if sample.visual_in == 0:
        return 1.0
    return sum(sample.layer_visual_tokens) / (len(sample.layer_visual_tokens) * sample.visual_in)

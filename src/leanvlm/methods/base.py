"""What a method is: a composition of stages, applied to one model instance at a time.

- A `PreLLMStage` reduces the visual tokens of every image / video frame after the projector, so the LLM
  input sequence is shorter from its first layer on.
- An `LLMStage` drops tokens from the hidden-state sequence after given decoder layers. The runtime asks it
  for a `Selection` (scores over the current tokens, which of them are candidates, how many candidates to
  keep per sample); the shared runtime does the top-k, keeps original order, and removes the dropped
  tokens from the hidden states, the positions, the attention mask and the later layers' KV cache.

A method subclass only says which stages it is made of (`stages()`); `Compose` builds one from stages.
"""

from __future__ import annotations

import math
import sys
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from leanvlm.runtime.context import LayerContext
    from leanvlm.runtime.engine import AppliedMethod
    from leanvlm.runtime.visual import VisualItem
    from leanvlm.stats import ReductionStats


def check_fraction(name: str, value: float, allow_zero: bool = False) -> float:
    """Validate a keep fraction: in (0, 1] (or [0, 1] with allow_zero). Returns it as float."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or math.isnan(value) or not ((value >= 0 if allow_zero else value > 0) and value <= 1):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return float(value)


def check_layer(name: str, layer: int, num_layers: int) -> None:
    """Validate a 0-indexed decoder layer after which a stage drops tokens."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
        raise ValueError(f"{name} must be a decoder layer index in [0, {num_layers - 1}] for this model, got {layer!r}")


def _matches(value: Any, annotation: Any) -> bool | None:
    """Whether value fits a simple annotation (bool / int / float / str / None / Literal / unions of them);
    None when the annotation is not one leanvlm checks (sequences, classes)."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return any(value == option and type(value) is type(option) for option in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        verdicts = [_matches(value, member) for member in typing.get_args(annotation)]
        return None if None in verdicts and not any(verdicts) else any(verdicts)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return None


def check_option_types(method: Any) -> None:
    """ValueError naming the option when a dataclass option's value does not fit its annotation, e.g.
    `AIM(prune="false")` (a string is truthy: it would silently prune)."""
    module = vars(sys.modules[type(method).__module__])
    for option in fields(method):
        if not option.init:
            continue
        annotation = option.type
        if isinstance(annotation, str):
            try:
                annotation = eval(annotation, module)  # noqa: S307 - the class's own annotation text
            except Exception:  # a name only imported for type checking: not a simple type
                continue
        value = getattr(method, option.name)
        if _matches(value, annotation) is False:
            expected = getattr(option.type, "__name__", str(option.type))
            raise ValueError(f"{type(method).__name__} option {option.name} must be {expected}, got {value!r}")


def keep_count(fraction: float | torch.Tensor, available: torch.Tensor, at_least_one: bool = True) -> torch.Tensor:
    """round(fraction * available) per sample, at least 1 where anything is available (unless disabled).

    available [B] long -> [B] long.
    """
    count = torch.round(available.double() * fraction).long()
    if at_least_one:
        count = torch.maximum(count, (available > 0).long())
    return torch.minimum(count, available)


@dataclass
class Selection:
    """An in-LLM stage's decision at one layer.

    scores [B, N] (higher = more important), candidates [B, N] bool (tokens that may be dropped; all
    others are kept), keep [B] long (how many candidates to keep per sample).
    """

    scores: torch.Tensor
    candidates: torch.Tensor
    keep: torch.Tensor


class LLMStage(ABC):
    """Drops tokens after some decoder layers. Layers are 0-indexed: acting at layer l means layer l still
    sees every token, its attention is what the stage scores with, and layers > l see only the kept ones."""

    @abstractmethod
    def layers(self, num_layers: int) -> list[int]:
        """The decoder layers after which this stage drops tokens (validated against the model's depth)."""

    @abstractmethod
    def select(self, ctx: LayerContext) -> Selection:
        """Score the current tokens at `ctx.layer` and say how many candidates to keep."""

    def planned_keep(self, layer: int, num_layers: int, visual_into_llm: int, visual_now: int) -> int:
        """Analytic visual-token count after `layer` of a `num_layers`-deep model (for FLOPs budgets), given
        the count that entered the LLM and the count at this layer. Input-dependent stages estimate."""
        return visual_now


class PreLLMStage(ABC):
    """Reduces the visual tokens of each image / video frame before the LLM."""

    #: vision-tower signals this stage reads (e.g. {"cls_attention"}); the model adapter captures them.
    needs: frozenset[str] = frozenset()

    @abstractmethod
    def reduce(self, item: VisualItem) -> VisualItem:
        """Return the item with fewer tokens per frame (order kept, `origin` and `groups` updated)."""

    def planned_tokens(self, tokens_per_frame: int) -> int:
        """Analytic tokens per frame after this stage (estimate for input-dependent stages)."""
        return tokens_per_frame


@dataclass
class Method:
    """Base of every method. Subclasses are small dataclasses whose `stages()` builds the stages.

    Usage::

        method = leanvlm.FastV(layer=2, keep=0.5)
        with method.apply(model):
            out = model.generate(**inputs)
        method.stats          # what the last forward did
    """

    stats: ReductionStats | None = field(default=None, init=False, repr=False, compare=False)

    def stages(self) -> tuple[Sequence[PreLLMStage], Sequence[LLMStage]]:
        """(pre-LLM stages, in-LLM stages), run in that order."""
        raise NotImplementedError(f"{type(self).__name__} must define stages()")

    def apply(self, model: torch.nn.Module) -> AppliedMethod:
        """Apply to ONE model instance, reversibly: use as a context manager (or call `.remove()`).

        Options are type-checked first (ValueError naming the option), before anything is installed."""
        from leanvlm.runtime.engine import AppliedMethod

        check_option_types(self)
        return AppliedMethod(self, model)


@dataclass
class Compose(Method):
    """A user-built method: any pre-LLM stages followed by any in-LLM stages."""

    pre: Sequence[PreLLMStage] = ()
    llm: Sequence[LLMStage] = ()

    def __post_init__(self) -> None:
        for name, kind in (("pre", PreLLMStage), ("llm", LLMStage)):
            stages = getattr(self, name)
            if isinstance(stages, (PreLLMStage, LLMStage)) or not isinstance(stages, Sequence):
                raise ValueError(f"Compose({name}=...) takes a list of stages, got {stages!r}")
            for stage in stages:
                if not isinstance(stage, kind):
                    hint = (" (a Method is not a stage: use its .stages())" if isinstance(stage, Method) else "")
                    raise ValueError(f"Compose({name}=[...]) needs {kind.__name__} instances, got {stage!r}{hint}")

    def stages(self) -> tuple[Sequence[PreLLMStage], Sequence[LLMStage]]:
        return tuple(self.pre), tuple(self.llm)

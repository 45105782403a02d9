"""What a method is: a composition of stages (`runtime/stages.py`: `PreLLMStage` before the LLM,
`LLMStage` inside it), applied to one model instance at a time.

A method subclass only says which stages it is made of (`stages()`); `Compose` builds one from stages.
"""

from __future__ import annotations

import math
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal

import torch

# The stage protocols live below the runtime (which runs them); re-exported here for method authors.
from leanvlm.runtime.stages import LLMStage, PreLLMStage, Selection, check_layer

if TYPE_CHECKING:
    from leanvlm.runtime.engine import AppliedMethod
    from leanvlm.stats import ReductionStats

__all__ = ["Compose", "LLMStage", "Method", "PreLLMStage", "Selection", "check_fraction", "check_layer",
           "check_option_types", "keep_count"]


def check_fraction(name: str, value: float, allow_zero: bool = False) -> float:
    """Validate a keep fraction: in (0, 1] (or [0, 1] with allow_zero). Returns it as float."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or math.isnan(value) or not ((value >= 0 if allow_zero else value > 0) and value <= 1):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return float(value)


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
class Method:
    """Base of every method. Subclasses are small dataclasses whose `stages()` builds the stages.

    Usage::

        method = leanvlm.FastV(layer=1, keep=0.5)
        with method.apply(model):
            out = model.generate(**inputs)
        method.stats          # what the last forward did
    """

    stats: ReductionStats | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_option_types(self)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every method checks its option types at construction, after its own `__post_init__` (whose
        messages name the allowed values), so e.g. `AIM(prune="false")` fails at once with the option's name."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is None or getattr(own, "checks_option_types", False):
            return

        def __post_init__(self: Method) -> None:
            own(self)
            check_option_types(self)

        __post_init__.checks_option_types = True  # type: ignore[attr-defined]
        cls.__post_init__ = __post_init__  # type: ignore[method-assign]

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

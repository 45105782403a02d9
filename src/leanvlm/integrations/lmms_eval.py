"""lmms-eval plugin: lmms-eval's transformers model wrappers with a leanvlm method applied.

Installed with leanvlm (entry point group `lmms_eval.models`, see pyproject.toml), so lmms-eval >= 0.7
finds these models by name without any change to lmms-eval (`lmms_eval.models.ModelRegistryV2
.load_entrypoint_manifests` loads `manifests()` below):

| model name                | lmms-eval model it wraps                  | checkpoints                                  |
|---------------------------|-------------------------------------------|----------------------------------------------|
| `leanvlm_llava_hf`        | `llava_hf` (simple and chat)              | llava-hf/* (LLaVA-1.5, LLaVA-OneVision -hf)  |
| `leanvlm_llava_onevision` | `llava_hf` (simple and chat)              | default llava-hf/llava-onevision-qwen2-7b-ov-hf |
| `leanvlm_qwen2_vl`        | `qwen2_vl` (simple)                       | Qwen/Qwen2-VL-*                              |

lmms-eval's own `llava_onevision` model runs the original LLaVA-NeXT code (`LlavaQwenForCausalLM`), which is
not a transformers class; leanvlm applies methods to transformers models only, so `leanvlm_llava_onevision`
runs the same checkpoints' transformers conversions (llava-hf/llava-onevision-*-hf) through `llava_hf`.

model_args: everything the wrapped model takes, plus
- `method=NAME` (a `leanvlm.methods.registry` name, default aim; `none` runs the model unchanged),
- the method's own options by name (`merge_keep=0.25,l1=14,l2=22`, `layer=1,keep=0.5`, ...),
- `budget=F`: set the method's knobs for a visual-token budget F instead (`registry.budget_options`),
- `leanvlm_stats=FILE`: write the mean visual tokens / analytic FLOPs over the run as JSON.

    accelerate launch --num_processes=8 -m lmms_eval --model leanvlm_llava_onevision \\
        --model_args pretrained=llava-hf/llava-onevision-qwen2-7b-ov-hf,method=aim,merge_keep=0.25 \\
        --tasks videomme --batch_size 1 --output_path ./logs/

The method is applied around every request batch (`generate_until`, `loglikelihood`, ...) and removed after
it, so the model object stays exactly the one lmms-eval loaded.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: plugin model name -> (simple base "module:Class", chat base "module:Class" or None, default pretrained)
WRAPPED: dict[str, tuple[str, str | None, str | None]] = {
    "leanvlm_llava_hf": ("lmms_eval.models.simple.llava_hf:LlavaHf", "lmms_eval.models.chat.llava_hf:LlavaHf", None),
    "leanvlm_llava_onevision": ("lmms_eval.models.simple.llava_hf:LlavaHf", "lmms_eval.models.chat.llava_hf:LlavaHf",
                                "llava-hf/llava-onevision-qwen2-7b-ov-hf"),
    "leanvlm_qwen2_vl": ("lmms_eval.models.simple.qwen2_vl:Qwen2_VL", None, None),
}

#: class names this module exposes (created on first access, so importing it never imports lmms-eval)
CLASSES: dict[str, tuple[str, str]] = {
    "LlavaHf": ("leanvlm_llava_hf", "simple"),
    "LlavaHfChat": ("leanvlm_llava_hf", "chat"),
    "LlavaOneVision": ("leanvlm_llava_onevision", "simple"),
    "LlavaOneVisionChat": ("leanvlm_llava_onevision", "chat"),
    "Qwen2VL": ("leanvlm_qwen2_vl", "simple"),
}

LEANVLM_ARGS = ("method", "budget", "leanvlm_stats")

logger = logging.getLogger("leanvlm.lmms_eval")


def manifests() -> list[Any]:
    """The `lmms_eval.models` entry point: one `ModelManifest` per plugin model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    result = []
    for model_id in WRAPPED:
        _, chat, _ = WRAPPED[model_id]
        names = {kind: name for name, (mid, kind) in CLASSES.items() if mid == model_id}
        result.append(ModelManifest(
            model_id=model_id,
            simple_class_path=f"{__name__}.{names['simple']}",
            chat_class_path=f"{__name__}.{names['chat']}" if chat and "chat" in names else None,
        ))
    return result


def _coerce(value: Any) -> Any:
    """lmms-eval parses numbers and true/false already; also read None, fractions and [a,b] lists."""
    if isinstance(value, str):
        from leanvlm.cli.common import parse_value

        return parse_value(value)
    return value


def split_method_args(kwargs: dict[str, Any]) -> tuple[str, dict[str, Any], float | None, str | None]:
    """Pop leanvlm's arguments from model_args kwargs (in place): (method name, its options, budget, stats path).

    A method's options are the init fields of its class; anything else stays for the wrapped model.
    """
    from leanvlm.methods.registry import METHODS

    name = str(kwargs.pop("method", "aim")).strip().lower()
    budget = kwargs.pop("budget", None)
    stats_path = kwargs.pop("leanvlm_stats", None)
    options: dict[str, Any] = {}
    if name not in ("none", ""):
        if name not in METHODS:
            raise ValueError(f"unknown leanvlm method {name!r}; known: none, {', '.join(METHODS)}")
        fields = {f.name for f in dataclasses.fields(METHODS[name]) if f.init}
        options = {key: _coerce(kwargs.pop(key)) for key in list(kwargs) if key in fields}
    return name, options, None if budget is None else float(_coerce(budget)), stats_path


class LeanvlmMixin:
    """Put before an lmms-eval model class: pops leanvlm's model_args, builds the method after the model
    loaded, and applies it around every request batch. Exposes `leanvlm_method` and `leanvlm_summary()`."""

    leanvlm_default_pretrained: str | None = None

    def __init__(self, **kwargs: Any) -> None:
        from leanvlm.hub import resolve_method

        name, options, budget, stats_path = split_method_args(kwargs)
        if self.leanvlm_default_pretrained and "pretrained" not in kwargs:
            kwargs["pretrained"] = self.leanvlm_default_pretrained
        super().__init__(**kwargs)
        if budget is not None and name != "none":
            from leanvlm.methods.registry import budget_options

            options = {**budget_options(name, budget, self.model), **options}
        self.leanvlm_method = resolve_method(name, options)
        self.leanvlm_stats_path = stats_path
        self.leanvlm_samples: list[Any] = []
        if self.leanvlm_method is not None:
            from leanvlm.models import get_adapter

            get_adapter(self.model)  # ValueError naming the supported classes, before any request runs

    @contextmanager
    def _leanvlm_applied(self) -> Iterator[None]:
        if self.leanvlm_method is None:
            yield
            return
        from leanvlm.hub import StatsRecorder

        with self.leanvlm_method.apply(self.model), StatsRecorder(self.model, self.leanvlm_method) as recorder:
            try:
                yield
            finally:
                self.leanvlm_samples.extend(recorder.samples)
                self._leanvlm_report()

    def leanvlm_summary(self) -> dict[str, Any]:
        """Means over every prompt so far: visual tokens in / into the LLM, analytic prefill TFLOPs, ratio."""
        from leanvlm.cli.common import method_options_dict
        from leanvlm.hub import summarize_samples

        method = self.leanvlm_method
        return {"method": None if method is None else type(method).__name__,
                "options": method_options_dict(method), **summarize_samples(self.leanvlm_samples)}

    def _leanvlm_report(self) -> None:
        summary = self.leanvlm_summary()
        if "samples" not in summary:
            return
        logger.info("leanvlm %s: %d prompts, visual tokens %.1f -> %.1f into the LLM, prefill FLOPs ratio %.2fx",
                    summary["method"], summary["samples"], summary["visual_in"], summary["visual_tokens"],
                    summary["flops_ratio"])
        if self.leanvlm_stats_path:
            directory = os.path.dirname(os.path.abspath(self.leanvlm_stats_path))
            os.makedirs(directory, exist_ok=True)
            with open(self.leanvlm_stats_path, "w") as handle:
                json.dump(summary, handle, indent=2)

    def generate_until(self, requests: list[Any]) -> list[Any]:
        with self._leanvlm_applied():
            return super().generate_until(requests)

    def loglikelihood(self, requests: list[Any]) -> list[Any]:
        with self._leanvlm_applied():
            return super().loglikelihood(requests)

    def generate_until_multi_round(self, requests: list[Any]) -> list[Any]:
        with self._leanvlm_applied():
            return super().generate_until_multi_round(requests)


def wrap(base: type, name: str, default_pretrained: str | None = None) -> type:
    """A subclass of lmms-eval model class `base` with a leanvlm method (see `LeanvlmMixin`)."""
    return type(name, (LeanvlmMixin, base), {
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"{base.__name__} (lmms-eval) with a leanvlm method: model_args method=NAME plus its options.",
        "leanvlm_default_pretrained": default_pretrained,
    })


def _load(path: str) -> type:
    module, attribute = path.split(":")
    return getattr(importlib.import_module(module), attribute)


_BUILT: dict[str, type] = {}


def __getattr__(name: str) -> type:  # PEP 562: classes are built on first access
    if name not in CLASSES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _BUILT:
        model_id, kind = CLASSES[name]
        simple, chat, default = WRAPPED[model_id]
        _BUILT[name] = wrap(_load(chat if kind == "chat" else simple), name, default)
    return _BUILT[name]

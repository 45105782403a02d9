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
- `leanvlm_stats=FILE`: write the mean visual tokens / analytic FLOPs over the run (every process) as JSON,
and `pretrained=bundled` runs leanvlm's bundled real model. The entry point also registers leanvlm's tasks
(`leanvlm_easyvqa`, `leanvlm_scenes`: `leanvlm.integrations.lmms_tasks`), whose documents report the
method's stats as task metrics; docs/lmms_eval.md.

    accelerate launch --num_processes=8 -m lmms_eval --model leanvlm_llava_onevision \\
        --model_args pretrained=llava-hf/llava-onevision-qwen2-7b-ov-hf,method=aim,merge_keep=0.25 \\
        --tasks videomme --batch_size 1 --output_path ./logs/

The method is applied around every request batch (`generate_until`, `loglikelihood`, ...) and removed after
it, so the model object stays exactly the one lmms-eval loaded.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
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
    """The `lmms_eval.models` entry point: one `ModelManifest` per plugin model. Also registers leanvlm's
    tasks (`leanvlm.integrations.lmms_tasks.register_tasks`: lmms-eval has no entry point for tasks)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    from leanvlm.integrations.lmms_tasks import register_tasks

    try:
        register_tasks()
    except ImportError as error:  # lmms-eval installed without its task dependencies: the models still work
        logger.warning("leanvlm's lmms-eval tasks are not registered: %s", error)

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


class _DocumentTracker:
    """Collects a method's stats over one request batch and attributes them to lmms-eval documents.

    lmms-eval models fetch a batch's documents (the request's doc_to_visual / doc_to_messages) just before
    generating for it, so the B samples of a prefill belong to the documents fetched since the previous
    prefill, in that order. leanvlm tasks' documents carry a `leanvlm_id`; when the count differs (a model
    that fetches ahead, another task's documents) the samples count in the summary but in no document.
    """

    def __init__(self, method: Any) -> None:
        self.method = method
        self.pending: list[str | None] = []  # leanvlm_id of each document fetched since the last prefill
        self.prompts: list[tuple[Any, list[str] | None]] = []  # (ReductionStats, its documents' ids or None)
        self._last: Any = None

    def fetching(self, fetch: Callable[..., Any]) -> Callable[..., Any]:
        def tracked(doc: Any, *args: Any, **kwargs: Any) -> Any:
            self.pending.append(doc.get("leanvlm_id") if isinstance(doc, Mapping) else None)
            return fetch(doc, *args, **kwargs)

        return tracked

    def track(self, requests: list[Any]) -> list[Any]:
        """Copies of the requests whose callables (the document fetchers) note each document fetched."""
        tracked = []
        for request in requests:
            if not hasattr(request, "arguments"):  # not an lmms-eval Instance: nothing to track
                tracked.append(request)
                continue
            copy_ = copy.copy(request)
            copy_.arguments = tuple(self.fetching(a) if callable(a) else a for a in request.args)
            tracked.append(copy_)
        return tracked

    def hook(self, module: Any, args: Any, output: Any) -> None:
        """Forward hook on the model: a new stats object means a prefill just ran."""
        stats = self.method.stats
        if stats is None or stats is self._last:
            return
        self._last = stats
        ids = self.pending if len(self.pending) == len(stats.samples) and None not in self.pending else None
        self.prompts.append((stats, None if ids is None else list(ids)))
        self.pending = []

    def collect(self, loose: list[Any]) -> dict[str, tuple[Any, float]]:
        """This batch's {leanvlm_id: (SampleStats, share of its prompt's reduction seconds)}; appends the
        unattributed samples to `loose`. Run after the batch (decode steps add to reduction_seconds)."""
        documents: dict[str, tuple[Any, float]] = {}
        for stats, ids in self.prompts:
            if ids is None:
                loose.extend(stats.samples)
                continue
            share = stats.reduction_seconds / len(ids)  # the prompt's reduction time, split over its documents
            for doc_id, sample in zip(ids, stats.samples):
                documents[doc_id] = (sample, share)
        return documents


class LeanvlmMixin:
    """Put before an lmms-eval model class: pops leanvlm's model_args, builds the method after the model
    loaded, and applies it around every request batch. Exposes `leanvlm_method` and `leanvlm_summary()`.

    `pretrained=bundled` is leanvlm's bundled real model (`leanvlm.load("bundled")`): the converted base
    checkpoint in leanvlm's cache (built on first use) with the shipped projector and LoRA merged in after
    loading. Without CUDA the device defaults to cpu, and `device_map` defaults to the device unless several
    GPU processes run (where the wrapped model places each on its own GPU).
    """

    leanvlm_default_pretrained: str | None = None

    def __init__(self, **kwargs: Any) -> None:
        from leanvlm.hub import resolve_method

        name, options, budget, stats_path = split_method_args(kwargs)
        if self.leanvlm_default_pretrained and "pretrained" not in kwargs:
            kwargs["pretrained"] = self.leanvlm_default_pretrained
        bundled = kwargs.get("pretrained") == "bundled"
        if bundled:
            kwargs["pretrained"] = bundled_checkpoint()
        _default_device(kwargs, inspect.signature(super().__init__).parameters)
        super().__init__(**kwargs)
        if bundled:
            from leanvlm.real_model.adapter import apply_adapter

            apply_adapter(self.model)
        if budget is not None and name != "none":
            from leanvlm.methods.registry import budget_options

            options = {**budget_options(name, budget, self.model), **options}
        self.leanvlm_method = resolve_method(name, options)
        self.leanvlm_stats_path = stats_path
        #: leanvlm_id -> (SampleStats, reduction seconds) of every leanvlm task document so far (this process)
        self.leanvlm_documents: dict[str, tuple[Any, float]] = {}
        #: SampleStats of prompts attributed to no leanvlm document (this process)
        self.leanvlm_samples: list[Any] = []
        if self.leanvlm_method is not None:
            from leanvlm.models import get_adapter

            get_adapter(self.model)  # ValueError naming the supported classes, before any request runs

    @contextmanager
    def _leanvlm_applied(self, requests: list[Any]) -> Iterator[list[Any]]:
        """Yields the requests to run (tracked copies while a method is applied); records the stats after."""
        if self.leanvlm_method is None:
            yield requests
            return
        from leanvlm.integrations.lmms_tasks import DocStats, record_doc_stats

        tracker = _DocumentTracker(self.leanvlm_method)
        with self.leanvlm_method.apply(self.model):
            handle = self.model.register_forward_hook(tracker.hook)  # after the method's hooks
            try:
                yield tracker.track(requests)
            finally:
                handle.remove()
                documents = tracker.collect(self.leanvlm_samples)
                self.leanvlm_documents.update(documents)
                for doc_id, (sample, seconds) in documents.items():  # for the task's process_results
                    record_doc_stats(doc_id, DocStats(sample.visual_in, sample.visual_into_llm, sample.base_flops,
                                                      sample.method_flops, seconds))
                self._leanvlm_report()

    def leanvlm_summary(self) -> dict[str, Any]:
        """Means over every prompt so far, on every process (gathered when torch.distributed runs several):
        visual tokens in / into the LLM, analytic prefill TFLOPs, their ratio and, over leanvlm task documents,
        reduction seconds per document. A document lmms-eval ran twice (padding a process's share) counts once.
        A collective under torch.distributed: every process must call it."""
        from leanvlm.cli.common import method_options_dict
        from leanvlm.hub import summarize_samples

        documents, loose = _gathered(self.leanvlm_documents, self.leanvlm_samples)
        samples = [sample for sample, _ in documents.values()] + loose
        method = self.leanvlm_method
        summary = {"method": None if method is None else type(method).__name__,
                   "options": method_options_dict(method), **summarize_samples(samples)}
        if documents:
            summary["documents"] = len(documents)
            summary["reduction_seconds"] = sum(seconds for _, seconds in documents.values()) / len(documents)
        return summary

    def _leanvlm_report(self) -> None:
        summary = self.leanvlm_summary()
        if "samples" not in summary or int(os.environ.get("RANK", "0")) != 0:
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
        with self._leanvlm_applied(requests) as tracked:
            return super().generate_until(tracked)

    def loglikelihood(self, requests: list[Any]) -> list[Any]:
        with self._leanvlm_applied(requests) as tracked:
            return super().loglikelihood(tracked)

    def generate_until_multi_round(self, requests: list[Any]) -> list[Any]:
        with self._leanvlm_applied(requests) as tracked:
            return super().generate_until_multi_round(tracked)


def _gathered(documents: dict[str, Any], loose: list[Any]) -> tuple[dict[str, Any], list[Any]]:
    """(documents, loose samples) of every process when torch.distributed runs several, else these.

    A collective: lmms-eval calls each request method once on every process (padding the shorter shares)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return documents, loose
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (documents, loose))
    merged: dict[str, Any] = {}
    everything: list[Any] = []
    for part_documents, part_loose in parts:
        merged.update(part_documents)
        everything.extend(part_loose)
    return merged, everything


def bundled_checkpoint() -> str:
    """Directory of the bundled real model's converted base checkpoint (built on first use, by the main
    process first when several run); `LeanvlmMixin` merges the shipped adapter after loading it."""
    from accelerate import PartialState

    from leanvlm.real_model.adapter import load_recipe
    from leanvlm.real_model.assemble import base_dir, load_base

    layer = load_recipe()["vision_feature_layer"]
    directory = base_dir(layer)
    with PartialState().main_process_first():
        if not os.path.exists(os.path.join(directory, "model.safetensors")):
            load_base(layer, progress=False)
    return directory


def _default_device(kwargs: dict[str, Any], parameters: Mapping[str, Any]) -> None:
    """Defaults for the wrapped model's `parameters` it has: device cuda if available else cpu; device_map
    the device, except for several GPU processes, where lmms-eval's llava_hf puts each on its own GPU
    (its default device_map="" is rejected by transformers 5 in one process, and on CPU it asks for CUDA)."""
    import torch

    if "device" in parameters:
        kwargs.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = str(kwargs.get("device", ""))
    wanted = device.startswith("cpu") or not several
    if "device_map" in parameters and "device_map" not in kwargs and device and wanted:
        kwargs["device_map"] = device


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

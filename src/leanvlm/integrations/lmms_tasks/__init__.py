"""lmms-eval tasks on leanvlm's bundled datasets, read from local files only (no hub):

| task              | documents (the same items, in the same order, as)  |
|-------------------|-----------------------------------------------------|
| `leanvlm_easyvqa` | `leanvlm eval --dataset easyvqa` (test split, 9,673) |
| `leanvlm_scenes`  | `leanvlm eval --dataset scenes` (test, 100 scenes)   |
| `leanvlm_clips`   | `leanvlm eval --dataset clips` (test, 40 clips)      |

The YAML files next to this module are the tasks; lmms-eval finds them because the plugin's model entry
point adds this directory to lmms-eval's task index (`register_tasks`), or explicitly with
`--include_path "$(python -c 'import leanvlm.integrations.lmms_tasks as t; print(t.TASK_DIR)')"`.

A task file names its dataset with `dataset_path: !function leanvlm.integrations.lmms_tasks.prepared_NAME`:
reading that attribute loads `leanvlm.cli.eval.load_items(NAME)` and writes the documents to a temporary
Arrow directory that lmms-eval opens with `load_from_disk`. So a new task is one YAML file of three lines,
as `leanvlm_clips.yaml`:

    task: leanvlm_clips
    dataset_path: !function leanvlm.integrations.lmms_tasks.prepared_clips
    include: _leanvlm_vqa_yaml

(The bundled video model is not an lmms-eval model yet: its frames processor is not what lmms-eval's
llava_onevision class loads; `leanvlm_clips` runs with a stock OneVision checkpoint.)

Documents: {"leanvlm_id": "easyvqa-test-17", "question", "answer", "qtype", "images": [PIL images]} (a VQA
item's image, or a clip item's frames: `documents`). Scoring is `leanvlm eval`'s
(`leanvlm.cli.eval.is_correct` on the generated answer). Besides `accuracy`, each document reports what a
leanvlm_* model's method did on it (`visual_in`, `visual_tokens`, `flops_ratio`, `reduction_seconds`, see
`record_doc_stats`); lmms-eval gathers these per-document values from every process and aggregates them.
"""

from __future__ import annotations

import atexit
import io
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

TASK_DIR = os.path.dirname(os.path.abspath(__file__))
_PREPARED_PREFIX = "prepared_"
_PREPARED: dict[tuple[str, str], str] = {}


# ------------------------------------------------------------------------------------------------ documents
def prepare_dataset(dataset: str, split: str = "test") -> str:
    """Write `load_items(dataset, split=split)` (a name or an easy-VQA-layout directory) as a
    `datasets.DatasetDict({"test": documents(...)})` to a temporary directory (removed at exit; once per
    process) and return its path, for lmms-eval's `load_from_disk`."""
    key = (dataset, split)
    if key in _PREPARED:
        return _PREPARED[key]
    import datasets

    from leanvlm.cli.eval import load_items

    name = os.path.basename(os.path.normpath(dataset))
    table = documents(load_items(dataset, None, split), f"{dataset}-{split}")
    directory = tempfile.mkdtemp(prefix=f"leanvlm-lmms-{name}-")
    atexit.register(shutil.rmtree, directory, True)
    datasets.DatasetDict({"test": table}).save_to_disk(os.path.join(directory, "data"))
    _PREPARED[key] = os.path.join(directory, "data")
    return _PREPARED[key]


def documents(items: Sequence[Any], prefix: str) -> Any:
    """A `datasets.Dataset` of the items (a VQA item's `image`, or a clip item's `frames`, as `images`);
    leanvlm_id = f"{prefix}-{index}". Items about one image / clip share one PNG encoding of it."""
    import datasets

    png: dict[str, list[bytes]] = {}  # image_key / clip_key -> PNG bytes of its images

    def encoded(item: Any) -> list[dict[str, Any]]:
        key = getattr(item, "image_key", None) or item.clip_key
        if key not in png:
            png[key] = []
            for image in getattr(item, "frames", None) or [item.image]:
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")  # lossless: the decoded image equals the item's pixels
                png[key].append(buffer.getvalue())
        return [{"bytes": data, "path": None} for data in png[key]]

    features = datasets.Features({
        "leanvlm_id": datasets.Value("string"), "question": datasets.Value("string"),
        "answer": datasets.Value("string"), "qtype": datasets.Value("string"),
        "images": datasets.List(datasets.Image()),
    })
    return datasets.Dataset.from_dict({
        "leanvlm_id": [f"{prefix}-{i}" for i in range(len(items))],
        "question": [it.question for it in items],
        "answer": [it.answer for it in items],
        "qtype": [it.qtype for it in items],
        "images": [encoded(it) for it in items],
    }, features=features)


def __getattr__(name: str) -> str:  # PEP 562: `prepared_NAME` is the prepared directory of dataset NAME
    if name.startswith(_PREPARED_PREFIX) and len(name) > len(_PREPARED_PREFIX):
        return prepare_dataset(name[len(_PREPARED_PREFIX):])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    """The document's images as RGB PIL images (one for a VQA item)."""
    return [image.convert("RGB") for image in doc["images"]]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    """The bare question: the model's own chat template wraps it, as `leanvlm eval` does."""
    return doc["question"]


# ------------------------------------------------------------------------------------------ method stats
@dataclass(frozen=True)
class DocStats:
    """What a leanvlm method did on one document's prompt (`leanvlm.stats.SampleStats` + its prompt's time)."""

    visual_in: int
    visual_tokens: int
    base_flops: float
    method_flops: float
    reduction_seconds: float


#: leanvlm_id -> stats, filled by the leanvlm_* models (same process) before lmms-eval scores the documents
DOC_STATS: dict[str, DocStats] = {}


def record_doc_stats(leanvlm_id: str, stats: DocStats) -> None:
    DOC_STATS[leanvlm_id] = stats


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    """accuracy (0/1, `leanvlm eval`'s scoring) and, if a leanvlm method ran on the document, its stats."""
    from leanvlm.cli.eval import is_correct

    out: dict[str, Any] = {"accuracy": float(is_correct(results[0], doc["answer"]))}
    stats = DOC_STATS.get(doc["leanvlm_id"])
    if stats is not None:
        out.update(visual_in=stats.visual_in, visual_tokens=stats.visual_tokens,
                   flops_ratio=(stats.base_flops, stats.method_flops), reduction_seconds=stats.reduction_seconds)
    return out


def flops_ratio(items: list[tuple[float, float]]) -> float:
    """Mean plain-model prefill FLOPs / mean method prefill FLOPs over the documents ((base, method) pairs),
    as `leanvlm eval` reports it."""
    if not items:
        raise ValueError("flops_ratio needs at least one (base, method) FLOPs pair")
    return sum(base for base, _ in items) / sum(method for _, method in items)


# ----------------------------------------------------------------------------------------- registration
def register_tasks() -> None:
    """Index this directory's tasks in every `lmms_eval.tasks.TaskManager` (idempotent).

    lmms-eval 0.7.3 has an entry point for models but none for tasks, and its LMMS_EVAL_PLUGINS variable
    extends the include path only after the CLI built its TaskManager; so the plugin's model entry point
    (run when lmms-eval imports its models, before any TaskManager exists) calls this.
    """
    from lmms_eval.tasks import TaskManager

    original = TaskManager.initialize_tasks
    if getattr(original, "leanvlm_tasks", False):
        return

    def initialize_tasks(self: Any, include_path: str | list[str] | None = None, include_defaults: bool = True) -> dict:
        paths = [include_path] if isinstance(include_path, str) else list(include_path or [])
        if include_defaults and TASK_DIR not in paths:
            paths.append(TASK_DIR)
        return original(self, include_path=paths, include_defaults=include_defaults)

    initialize_tasks.leanvlm_tasks = True  # type: ignore[attr-defined]
    TaskManager.initialize_tasks = initialize_tasks

"""`leanvlm eval` and `leanvlm sweep`: accuracy, visual tokens and analytic prefill FLOPs of a method on a
VQA dataset, and every method at several FLOPs budgets (table + JSON + Pareto plot)."""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from leanvlm.cli.common import CLIError, LoadedModel, describe_method, err_console, method_options_dict
from leanvlm.hub import StatsRecorder, build_inputs, summarize_samples
from leanvlm.methods.base import Method

DATASETS = ("easyvqa", "scenes")


# ----------------------------------------------------------------------------------------------- datasets
def load_items(dataset: str, limit: int | None = None, split: str = "test", seed: int = 0) -> list[Any]:
    """VQA items (image, question, answer, qtype) of "easyvqa", "scenes" or a directory in easy-VQA's layout
    (images/N.png + questions.json rows [question, answer, N]). limit: the first N items."""
    from leanvlm.real_model import data

    if dataset == "easyvqa":
        try:
            items = data.easyvqa(split)
        except ImportError as error:
            raise CLIError(str(error)) from error
    elif dataset == "scenes":
        scenes = 100 if limit is None else max(1, math.ceil(limit / 3))
        items = data.scenes(split, scenes, seed=seed)
    elif os.path.isdir(dataset):
        if not os.path.exists(os.path.join(dataset, "questions.json")):
            raise CLIError(f"{dataset!r} has no questions.json (expected easy-VQA's layout: images/N.png + questions.json)")
        try:
            items = data.load_vqa_dir(dataset, prefix=os.path.basename(os.path.normpath(dataset)) + "-")
        except ValueError as error:
            raise CLIError(str(error)) from error
    else:
        raise CLIError(f"unknown dataset {dataset!r}: use easyvqa, scenes or a directory")
    if limit is not None and limit < 1:
        raise CLIError(f"--limit must be >= 1, got {limit}")
    items = items[:limit] if limit is not None else items
    if not items:
        raise CLIError(f"dataset {dataset!r} has no questions")
    return items


def normalize(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]+", " ", text.lower()).strip()


def is_correct(prediction: str, answer: str) -> bool:
    """Free-form scoring: the normalized prediction equals the answer or starts with it as a word."""
    pred, gold = normalize(prediction), normalize(answer)
    return pred == gold or pred.startswith(gold + " ")


Predictor = Callable[[list[Any], list[str]], list[str]]


def make_predictor(loaded: LoadedModel, mode: str = "auto", max_new_tokens: int = 8) -> tuple[Predictor, str]:
    """(predict(images, questions) -> answers, mode name).

    "closed" (default for the bundled model): `real_model.score_answers`, one forward pass per batch
    restricted to the closed answer set, as the bundled model's own metrics are measured. "generate"
    (default for other models): greedy generation of up to max_new_tokens, scored by `is_correct`.
    """
    if mode == "auto":
        mode = "closed" if loaded.bundled else "generate"
    if mode == "closed":
        if not loaded.bundled:
            raise CLIError("--mode closed needs the bundled model (its closed answer set); use --mode generate")
        from leanvlm.real_model import score_answers

        return (lambda images, questions: score_answers(loaded.model, loaded.processor, images, questions)), mode
    if mode != "generate":
        raise CLIError(f"--mode must be auto, closed or generate, got {mode!r}")
    model, processor = loaded.model, loaded.processor

    @torch.no_grad()
    def predict(images: list[Any], questions: list[str]) -> list[str]:
        parameter = next(model.parameters())
        inputs = build_inputs(processor, [("image", im) for im in images], questions, parameter.device, parameter.dtype)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        tokenizer = getattr(processor, "tokenizer", processor)
        return [t.strip() for t in tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]

    return predict, mode


def progress_bar(transient: bool = False) -> Progress:
    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=err_console, transient=transient)


def evaluate(
    loaded: LoadedModel,
    items: Sequence[Any],
    method: Method | None,
    batch_size: int = 8,
    mode: str = "auto",
    max_new_tokens: int = 8,
    progress: Progress | None = None,
    description: str = "eval",
) -> dict[str, Any]:
    """Run `method` (None: the plain model) over the items in batches; returns the summary dict:
    accuracy, n, visual_in / visual_tokens (means, into the LLM), base_tflops / method_tflops (mean analytic
    LLM prefill FLOPs per sample), flops_ratio (mean base / mean method), per_type accuracies, seconds.
    The plain model is measured with an empty `Compose()` (counts tokens, drops nothing)."""
    from leanvlm.methods.base import Compose

    if not items:
        raise CLIError("no items to evaluate")
    predict, mode = make_predictor(loaded, mode, max_new_tokens)
    if mode == "closed":
        from leanvlm.real_model import ANSWERS

        outside = sorted({it.answer for it in items} - set(ANSWERS))
        if outside:
            raise CLIError(f"answers {', '.join(map(repr, outside[:5]))} are outside the bundled model's closed answer "
                           f"set ({', '.join(ANSWERS)}); score them with --mode generate")
    applied_method = method if method is not None else Compose()
    correct = 0
    per_type: dict[str, list[int]] = {}
    own = progress is None
    bar = progress_bar() if own else progress
    start = time.perf_counter()
    with bar if own else _null():
        task = bar.add_task(description, total=len(items), info="")
        with applied_method.apply(loaded.model), StatsRecorder(loaded.model, applied_method) as recorder:
            for first in range(0, len(items), batch_size):
                batch = items[first:first + batch_size]
                answers = predict([it.image for it in batch], [it.question for it in batch])
                for item, answer in zip(batch, answers):
                    ok = is_correct(answer, item.answer)
                    correct += ok
                    per_type.setdefault(getattr(item, "qtype", "all"), []).append(int(ok))
                done = first + len(batch)
                bar.update(task, advance=len(batch), info=f"acc {correct / done:.3f}")
        if not own:
            bar.remove_task(task)
    seconds = time.perf_counter() - start
    summary = summarize_samples(recorder.samples)
    return {
        "method": "none" if method is None else type(method).__name__.lower(),
        "method_repr": describe_method(method),
        "options": method_options_dict(method),
        "mode": mode,
        "n": len(items),
        "accuracy": correct / len(items),
        "per_type": {k: sum(v) / len(v) for k, v in sorted(per_type.items())},
        "visual_in": summary.get("visual_in"),
        "visual_tokens": summary.get("visual_tokens"),
        "base_tflops": summary.get("base_tflops"),
        "method_tflops": summary.get("method_tflops"),
        "flops_ratio": summary.get("flops_ratio"),
        "token_fraction": summary.get("token_fraction"),
        "seconds": seconds,
    }


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


# -------------------------------------------------------------------------------------------------- sweep
def prompt_shape(loaded: LoadedModel, item: Any) -> tuple[int, int]:
    """(visual tokens, other tokens) of one item's prompt as the model's processor builds it."""
    from leanvlm.models import get_adapter

    inputs = build_inputs(loaded.processor, [("image", item.image)], [item.question])
    ids = inputs["input_ids"][0]
    visual = int(torch.isin(ids, torch.tensor(get_adapter(loaded.model).visual_token_ids)).sum())
    return visual, int(ids.numel()) - visual


def analytic_ratio(method: Method, config: Any, visual_tokens: int, text_tokens: int) -> float:
    """Full / method analytic LLM prefill FLOPs of `method` on one image of `visual_tokens` + text."""
    from leanvlm import flops as F

    shape = F.LLMShape.from_config(config)
    workload = F.Workload(llm=shape, tokens_per_frame=visual_tokens, frames=1, text_tokens=text_tokens)
    base = F.llm_prefill_flops(workload.base_tokens_per_layer(), shape)
    return base / F.llm_prefill_flops(F.stages_cost(method, workload).per_layer_tokens, shape)


def method_for_flops(name: str, target_ratio: float, config: Any, visual_tokens: int, text_tokens: int,
                     tolerance: float = 0.03) -> tuple[Method | None, float, float]:
    """The method `name` configured so that its analytic prefill FLOPs are `target_ratio` of the full model.

    Bisection on the registry's visual-token budget (`registry.budget_options`), which every method maps to
    its own knobs. -> (method or None if unreachable, visual budget, achieved analytic full/method ratio).
    """
    from leanvlm.methods.registry import method_for_budget

    target = 1 / target_ratio  # reduction factor wanted

    def attempt(budget: float) -> tuple[Method | None, float]:
        try:
            method = method_for_budget(name, budget, config)
            return method, analytic_ratio(method, config, visual_tokens, text_tokens)
        except ValueError:
            return None, math.inf  # too small a budget for this method's knobs

    low, high = 1e-3, 1.0
    best: tuple[Method | None, float, float] = (None, high, 0.0)
    for _ in range(40):
        middle = math.sqrt(low * high)
        method, ratio = attempt(middle)
        if method is not None and (best[0] is None or abs(ratio - target) < abs(best[2] - target)):
            best = (method, middle, ratio)
        if ratio > target:
            low = middle
        else:
            high = middle
        if method is not None and abs(ratio - target) / target <= tolerance / 4:
            break
    method, budget, ratio = best
    if method is None or abs(ratio - target) / target > tolerance:
        return None, budget, ratio
    return method, budget, ratio


def pareto_front(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows not dominated by another row (at least as accurate and as cheap, strictly better in one)."""
    front = []
    for row in rows:
        dominated = any(
            o["accuracy"] >= row["accuracy"] and o["flops_ratio"] >= row["flops_ratio"]
            and (o["accuracy"] > row["accuracy"] or o["flops_ratio"] > row["flops_ratio"])
            for o in rows
        )
        if not dominated:
            front.append(row)
    return front


def markdown_table(rows: Sequence[dict[str, Any]], baseline: dict[str, Any] | None, title: str) -> str:
    lines = [f"# {title}", "", "| method | target FLOPs | configuration | accuracy | visual tokens into LLM | "
             "prefill TFLOPs (analytic) | FLOPs ratio (full / method) | Pareto |", "|---|---|---|---|---|---|---|---|"]
    front = {id(r) for r in pareto_front(rows)}
    for row in ([baseline] if baseline else []) + list(rows):
        target = "-" if row.get("target") is None else f"1/{1 / row['target']:.3g}"
        options = row.get("method_repr", "-")
        lines.append(
            f"| {row['method']} | {target} | {options} | {row['accuracy']:.3f} | {row['visual_tokens']:.1f} | "
            f"{row['method_tflops']:.4g} | {row['flops_ratio']:.2f}x | {'yes' if id(row) in front else ''} |"
        )
    return "\n".join(lines) + "\n"



"""`leanvlm eval` and `leanvlm sweep`: accuracy, visual tokens and analytic prefill FLOPs of a method on a
VQA dataset, and every method at several FLOPs budgets (table + JSON + Pareto plot)."""

from __future__ import annotations

import math
import os
import re
import time
from contextlib import nullcontext
from collections.abc import Callable, Sequence
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from leanvlm.cli.batching import SharedVisionEncoding, group_by_image, plan_batches, shared_prefix_last_logits
from leanvlm.cli.common import CLIError, LoadedModel, describe_method, err_console, method_options_dict
from leanvlm.hub import StatsRecorder, build_inputs, summarize_samples
from leanvlm.methods.base import Method
from leanvlm.stats import SampleStats

DATASETS = ("easyvqa", "scenes", "clips")


# ----------------------------------------------------------------------------------------------- datasets
def load_items(dataset: str, limit: int | None = None, split: str = "test", seed: int = 0,
               frames: int | None = None) -> list[Any]:
    """VQA items of "easyvqa", "scenes" (VQAItem: image, question, answer, qtype), "clips" (ClipItem: frames,
    ...) or a directory: easy-VQA's layout (images/N.png + questions.json rows [question, answer, N]) or
    the same with videos/N/ frame folders or videos/N.gif|mp4 files (`clips.load_clip_dir`; `frames`
    sampled per clip, default 8). limit: the first N items."""
    from leanvlm.real_model import clips, data

    if dataset == "easyvqa":
        try:
            items = data.easyvqa(split)
        except ImportError as error:
            raise CLIError(str(error)) from error
    elif dataset == "scenes":
        scenes = 100 if limit is None else max(1, math.ceil(limit / 3))
        items = data.scenes(split, scenes, seed=seed)
    elif dataset == "clips":
        items = clips.clips(split, 40 if limit is None else max(1, math.ceil(limit / 5)), seed=seed)
    elif os.path.isdir(dataset):
        if not os.path.exists(os.path.join(dataset, "questions.json")):
            raise CLIError(f"{dataset!r} has no questions.json (expected easy-VQA's layout: images/N.png or "
                           "videos/N/ | videos/N.gif + questions.json)")
        prefix = os.path.basename(os.path.normpath(dataset)) + "-"
        try:
            if os.path.isdir(os.path.join(dataset, "videos")):
                from leanvlm.hub import load_video

                items = clips.load_clip_dir(dataset, load_video, frames or clips.FRAMES, prefix=prefix)
            else:
                items = data.load_vqa_dir(dataset, prefix=prefix)
        except ValueError as error:
            raise CLIError(str(error)) from error
    else:
        raise CLIError(f"unknown dataset {dataset!r}: use easyvqa, scenes, clips or a directory")
    if limit is not None and limit < 1:
        raise CLIError(f"--limit must be >= 1, got {limit}")
    items = items[:limit] if limit is not None else items
    if not items:
        raise CLIError(f"dataset {dataset!r} has no questions")
    return items


def is_video(item: Any) -> bool:
    """An item about a clip (ClipItem: `.frames`) rather than an image."""
    return hasattr(item, "frames")


def normalize(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]+", " ", text.lower()).strip()


def is_correct(prediction: str, answer: str) -> bool:
    """Free-form scoring: the normalized prediction equals the answer or starts with it as a word."""
    pred, gold = normalize(prediction), normalize(answer)
    return pred == gold or pred.startswith(gold + " ")


Predictor = Callable[[list[Any], list[int]], list[str]]


def make_predictor(loaded: LoadedModel, mode: str = "auto", max_new_tokens: int = 8,
                   shared_prefix: bool = False,
                   on_inputs: Callable[[dict[str, torch.Tensor]], None] | None = None) -> tuple[Predictor, str]:
    """(predict(items, group ids) -> answers, mode name). Rows with the same group id ask about one image.

    "closed" (default for the bundled models): one forward pass per batch, the last position's logits
    restricted to the first token of each answer of the closed answer set (`real_model.ANSWERS`; for clips
    `clips.CLIP_ANSWERS`), as the bundled models' own metrics are measured; with `shared_prefix` (the plain model only) each image's
    prompt prefix is computed once for its questions (`batching.shared_prefix_last_logits`); on_inputs(inputs)
    sees every batch's model inputs (input_ids / attention_mask [B, T], ...). "generate" (default for other
    models): greedy generation of up to max_new_tokens, scored by `is_correct`.
    """
    if mode == "auto":
        mode = "closed" if loaded.bundled else "generate"
    model, processor = loaded.model, loaded.processor
    if mode == "closed":
        if not loaded.bundled:
            raise CLIError("--mode closed needs the bundled model (its closed answer set); use --mode generate")
        from leanvlm.models import get_adapter
        from leanvlm.real_model import ANSWERS, answer_token_ids, prepare_inputs

        from leanvlm.real_model.clips import CLIP_ANSWERS
        from leanvlm.real_model.video_model import clip_answer_token_ids, prepare_video_inputs

        visual_ids = get_adapter(model).visual_token_ids

        @torch.no_grad()
        def closed(items: list[Any], groups: list[int]) -> list[str]:
            questions = [it.question for it in items]
            if is_video(items[0]):
                answers, candidates = CLIP_ANSWERS, clip_answer_token_ids(processor)
                inputs = prepare_video_inputs(processor, [it.frames for it in items], questions).to(model.device)
                inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(model.dtype)
            else:
                answers, candidates = ANSWERS, answer_token_ids(processor)
                inputs = prepare_inputs(processor, [it.image for it in items], questions).to(model.device)
                inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            if on_inputs is not None:
                on_inputs(inputs)
            logits = shared_prefix_last_logits(model, inputs, groups, visual_ids) if shared_prefix else None
            if logits is None:
                logits = model(**inputs, logits_to_keep=1).logits[:, -1]  # [B, vocab]
            return [answers[i] for i in logits[:, candidates].argmax(-1).tolist()]

        return closed, mode
    if mode != "generate":
        raise CLIError(f"--mode must be auto, closed or generate, got {mode!r}")

    @torch.no_grad()
    def predict(items: list[Any], groups: list[int]) -> list[str]:
        parameter = next(model.parameters())
        inputs = build_inputs(processor, [it.media for it in items], [it.question for it in items],
                              parameter.device, parameter.dtype)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        tokenizer = getattr(processor, "tokenizer", processor)
        return [t.strip() for t in tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]

    return predict, mode


def progress_bar(transient: bool = False) -> Progress:
    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=err_console, transient=transient)


def plain_sample_stats(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[SampleStats]:
    """What an empty `Compose()` records for the plain model on a left-padded batch [B, T]: every layer
    computes on every real token, base FLOPs = method FLOPs."""
    from leanvlm.flops import LLMShape, llm_prefill_flops
    from leanvlm.models import get_adapter

    shape = LLMShape.from_config(model.config)
    visual = torch.isin(input_ids, torch.tensor(get_adapter(model).visual_token_ids, device=input_ids.device))
    samples = []
    for b in range(input_ids.shape[0]):
        real = attention_mask[b].bool()
        tokens, seen = int(real.sum()), int((visual[b] & real).sum())
        flops = llm_prefill_flops([tokens] * shape.layers, shape)
        samples.append(SampleStats(visual_in=seen, visual_into_llm=seen, layer_tokens=[tokens] * shape.layers,
                                   layer_visual_tokens=[seen] * shape.layers, base_flops=flops, method_flops=flops))
    return samples


def vision_tower(model: Any) -> torch.nn.Module | None:
    """The model's vision encoder module (LLaVA family: `vision_tower`, Qwen2-VL: `visual`), None if unknown."""
    from leanvlm.models import get_adapter

    module = get_adapter(model).multimodal_module
    return getattr(module, "vision_tower", None) or getattr(module, "visual", None)


def evaluate(
    loaded: LoadedModel,
    items: Sequence[Any],
    method: Method | None,
    batch_size: int = 32,
    mode: str = "auto",
    max_new_tokens: int = 8,
    progress: Progress | None | bool = None,
    description: str = "eval",
    share_images: bool = True,
    group_images: bool = True,
) -> dict[str, Any]:
    """Run `method` (None: the plain model) over the items; returns the summary dict: accuracy, n,
    predictions (per item, in the items' order), visual_in / visual_tokens (means, into the LLM),
    base_tflops / method_tflops (mean analytic LLM prefill FLOPs per sample), flops_ratio (mean base /
    mean method), per_type accuracies, seconds, questions_per_second. progress: a Progress to add a task
    to, None for an own bar, False for none.

    Batches are whole image groups of at most `batch_size` questions (`batching.plan_batches`). With
    `share_images` (default) each distinct image of a batch goes through the vision tower once when the
    method's pre-LLM stages ask for no vision-tower signals, and the plain model in closed mode computes
    each image's prompt prefix once for all its questions; answers equal the one-by-one ones up to float
    rounding (tests/test_eval_batching.py). The plain model is otherwise measured with an empty
    `Compose()` (counts tokens, drops nothing). group_images=False: batches of consecutive items instead
    (the loop before image grouping, kept for benchmarks/bench_eval.py)."""
    start = time.perf_counter()
    predictions, samples, mode = run_items(loaded, items, method, batch_size, mode, max_new_tokens, progress,
                                           description, share_images, group_images=group_images)
    return summarize(items, predictions, samples, method, mode, time.perf_counter() - start)


def run_items(
    loaded: LoadedModel,
    items: Sequence[Any],
    method: Method | None,
    batch_size: int = 32,
    mode: str = "auto",
    max_new_tokens: int = 8,
    progress: Progress | None | bool = None,
    description: str = "eval",
    share_images: bool = True,
    on_batch: Callable[[int, int], None] | None = None,
    group_images: bool = True,
) -> tuple[list[str], list[SampleStats], str]:
    """The work of `evaluate`: -> (predictions in the items' order, per-sample stats, mode used).
    progress: a Progress to add a task to, None for an own bar, False for none. on_batch(questions,
    correct) is called after every batch."""
    from leanvlm.methods.base import Compose

    if not items:
        raise CLIError("no items to evaluate")
    if batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {batch_size}")
    resolved = "closed" if mode == "auto" and loaded.bundled else "generate" if mode == "auto" else mode
    video = is_video(items[0])
    if any(is_video(it) != video for it in items):
        raise CLIError("a dataset mixes images and clips; evaluate them separately")
    # clips share the vision tower's work (their frames repeat row by row) but not the prompt prefix, which
    # is computed for one image per prompt
    shared_prefix = share_images and not video and method is None and resolved == "closed"
    samples: list[SampleStats] = []

    def record_plain_stats(inputs: dict[str, torch.Tensor]) -> None:
        # no method applied: the plain model's stats from the prompts' token counts
        samples.extend(plain_sample_stats(loaded.model, inputs["input_ids"], inputs["attention_mask"]))

    predict, mode = make_predictor(loaded, mode, max_new_tokens, shared_prefix=shared_prefix,
                                   on_inputs=record_plain_stats if shared_prefix else None)
    if mode == "closed":
        from leanvlm.real_model import ANSWERS
        from leanvlm.real_model.clips import CLIP_ANSWERS

        closed_set = CLIP_ANSWERS if video else ANSWERS
        outside = sorted({it.answer for it in items} - set(closed_set))
        if outside:
            raise CLIError(f"answers {', '.join(map(repr, outside[:5]))} are outside the bundled model's closed answer "
                           f"set ({', '.join(closed_set)}); score them with --mode generate")
    applied_method = method if method is not None else Compose()
    pre_stages, _ = applied_method.stages()
    needs_tower_signals = any(stage.needs for stage in pre_stages)
    tower = vision_tower(loaded.model) if share_images and not needs_tower_signals else None
    groups = group_by_image(items)
    group_of = {index: g for g, group in enumerate(groups) for index in group}
    if not group_images:
        groups = [[index] for index in range(len(items))]
    predictions: list[str] = [""] * len(items)
    correct, done = 0, 0
    own = progress is None
    bar = progress_bar() if own else (progress or None)
    start = time.perf_counter()
    with (bar if own else nullcontext()), (nullcontext() if shared_prefix else applied_method.apply(loaded.model)), \
            (SharedVisionEncoding(tower) if tower is not None else nullcontext()), \
            (nullcontext() if shared_prefix else StatsRecorder(loaded.model, applied_method)) as recorder:
        task = bar.add_task(description, total=len(items), info="") if bar is not None else None
        for batch in plan_batches(groups, batch_size):
            batch_items = [items[i] for i in batch]
            answers = predict(batch_items, [group_of[i] for i in batch])
            right = 0
            for index, answer in zip(batch, answers, strict=True):
                predictions[index] = answer
                right += is_correct(answer, items[index].answer)
            correct += right
            done += len(batch)
            if on_batch is not None:
                on_batch(len(batch), right)
            if bar is not None:
                rate = done / max(time.perf_counter() - start, 1e-9)
                bar.update(task, advance=len(batch), info=f"acc {correct / done:.3f}  {rate:.2f} q/s")
        if bar is not None and not own:
            bar.remove_task(task)
    if recorder is not None:
        samples = recorder.samples
    return predictions, samples, mode


def summarize(items: Sequence[Any], predictions: Sequence[str], samples: Sequence[SampleStats], method: Method | None,
              mode: str, seconds: float) -> dict[str, Any]:
    """The result dict of `evaluate` from per-item predictions and the recorded per-sample stats (any order:
    only their means are reported)."""
    per_type: dict[str, list[int]] = {}
    for item, answer in zip(items, predictions, strict=True):
        per_type.setdefault(getattr(item, "qtype", "all"), []).append(int(is_correct(answer, item.answer)))
    correct = sum(sum(v) for v in per_type.values())
    summary = summarize_samples(samples)
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
        "questions_per_second": len(items) / seconds if seconds > 0 else None,
        "predictions": list(predictions),
        **({"frames": len(items[0].frames)} if is_video(items[0]) else {}),
    }


# ------------------------------------------------------------------------------------- several processes
def _shard_worker(rank: int, processes: int, spec: dict[str, Any], queue: Any) -> None:
    """One process of `evaluate_processes`: loads the model and the items itself, evaluates the image groups
    rank, rank + processes, ... and puts ("batch", questions, correct) messages, then ("done", rank,
    indices, predictions, samples, mode) or ("error", rank, message) on `queue`."""
    try:
        import torch as _torch

        from leanvlm.cli.common import load_model

        _torch.set_num_threads(spec["threads"])
        items = load_items(spec["dataset"], spec["limit"], spec["split"])
        groups = group_by_image(items)
        mine = sorted(i for group in groups[rank::processes] for i in group)
        if not mine:
            queue.put(("done", rank, [], [], [], spec["mode"]))
            return
        loaded = load_model(spec["model"], spec["device"], spec["dtype"], video=is_video(items[0]))
        predictions, samples, mode = run_items(
            loaded, [items[i] for i in mine], spec["method"], spec["batch_size"], spec["mode"], spec["max_new_tokens"],
            progress=False, share_images=spec["share_images"],
            on_batch=lambda questions, correct: queue.put(("batch", questions, correct)))
        queue.put(("done", rank, mine, predictions, samples, mode))
    except BaseException as error:  # reported by the parent as one line
        queue.put(("error", rank, f"{type(error).__name__}: {error}"))


def evaluate_processes(
    dataset: str,
    limit: int | None,
    split: str,
    model: str | None,
    method: Method | None,
    processes: int,
    batch_size: int = 32,
    mode: str = "auto",
    max_new_tokens: int = 8,
    device: str | None = None,
    dtype: str = "auto",
    share_images: bool = True,
    description: str = "eval",
) -> dict[str, Any]:
    """`evaluate` over `processes` local processes (multiprocessing, spawn): each loads the model and the
    items, takes every processes-th image group, and sends back its predictions and per-sample stats; the
    parent gathers them into the same result as one process (same predictions, accuracy and stats means
    up to float rounding; tests/test_eval_batching.py). CPU threads are split evenly between them."""
    import multiprocessing

    if processes < 1:
        raise CLIError(f"--processes must be >= 1, got {processes}")
    items = load_items(dataset, limit, split)
    spec = {"dataset": dataset, "limit": limit, "split": split, "model": model, "method": method,
            "batch_size": batch_size, "mode": mode, "max_new_tokens": max_new_tokens, "device": device,
            "dtype": dtype, "share_images": share_images, "threads": max(1, torch.get_num_threads() // processes)}
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_shard_worker, args=(rank, processes, spec, queue), daemon=True)
               for rank in range(processes)]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    predictions: list[str] = [""] * len(items)
    samples: list[list[SampleStats]] = [[] for _ in range(processes)]
    modes: set[str] = set()
    finished, done, correct = 0, 0, 0
    try:
        with progress_bar() as bar:
            task = bar.add_task(f"{description} ({processes} processes)", total=len(items), info="")
            while finished < processes:
                try:
                    message = queue.get(timeout=5)
                except Exception:  # queue.Empty: check that no worker died without a word
                    dead = [w for w in workers if w.exitcode not in (None, 0)]
                    if dead:
                        raise CLIError(f"an evaluation process exited with code {dead[0].exitcode}")
                    continue
                if message[0] == "error":
                    raise CLIError(f"process {message[1]}: {message[2]}")
                if message[0] == "batch":
                    done += message[1]
                    correct += message[2]
                    rate = done / max(time.perf_counter() - start, 1e-9)
                    bar.update(task, advance=message[1], info=f"acc {correct / max(done, 1):.3f}  {rate:.2f} q/s")
                    continue
                _, rank, indices, shard_predictions, shard_samples, shard_mode = message
                for index, answer in zip(indices, shard_predictions, strict=True):
                    predictions[index] = answer
                samples[rank] = shard_samples
                if indices:  # an empty shard never resolved "auto"
                    modes.add(shard_mode)
                finished += 1
    finally:
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.terminate()
    gathered = [sample for shard in samples for sample in shard]
    return summarize(items, predictions, gathered, method, modes.pop(), time.perf_counter() - start)


# -------------------------------------------------------------------------------------------------- sweep
def prompt_shape(loaded: LoadedModel, item: Any) -> tuple[int, int]:
    """(visual tokens, other tokens) of one item's prompt as the model's processor builds it."""
    from leanvlm.models import get_adapter

    inputs = build_inputs(loaded.processor, [item.media], [item.question])
    ids = inputs["input_ids"][0]
    visual = int(torch.isin(ids, torch.tensor(get_adapter(loaded.model).visual_token_ids)).sum())
    if is_video(item):  # OneVision-style: frames x pooled tokens + one newline, which the runtime protects
        visual -= visual % len(item.frames)
    return visual, int(ids.numel()) - visual


def analytic_ratio(method: Method, config: Any, visual_tokens: int, text_tokens: int, frames: int = 1) -> float:
    """Full / method analytic LLM prefill FLOPs of `method` on one image (or a video of `frames` frames) of
    `visual_tokens` in all + text."""
    from leanvlm import flops as F

    shape = F.LLMShape.from_config(config)
    workload = F.Workload(llm=shape, tokens_per_frame=visual_tokens // frames, frames=frames, text_tokens=text_tokens,
                          kind="video" if frames > 1 else "image")
    base = F.llm_prefill_flops(workload.base_tokens_per_layer(), shape)
    return base / F.llm_prefill_flops(F.stages_cost(method, workload).per_layer_tokens, shape)


#: How far (relative) a method's analytic FLOPs ratio may land from a sweep target. Token counts are whole
#: numbers per frame: on the 8-frame clips (64 tokens a frame) one token a frame moves the ratio ~9% near 1/7
#: (7 tokens: 6.75x, 6: 7.41x), so the nearest setting can be ~4.5% off.
BUDGET_TOLERANCE = 0.05


def method_for_flops(name: str, target_ratio: float, config: Any, visual_tokens: int, text_tokens: int,
                     tolerance: float = BUDGET_TOLERANCE, frames: int = 1) -> tuple[Method | None, float, float]:
    """The method `name` configured so that its analytic prefill FLOPs are `target_ratio` of the full model.

    Bisection on the registry's visual-token budget (`registry.budget_options`), which every method maps to
    its own knobs. -> (method or None if unreachable, visual budget, achieved analytic full/method ratio).
    """
    from leanvlm.methods.registry import method_for_budget

    target = 1 / target_ratio  # reduction factor wanted

    def attempt(budget: float) -> tuple[Method | None, float]:
        try:
            method = method_for_budget(name, budget, config)
            return method, analytic_ratio(method, config, visual_tokens, text_tokens, frames)
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



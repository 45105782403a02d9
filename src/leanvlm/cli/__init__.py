"""The `leanvlm` command: run, eval, sweep, bench, flops, show, doctor, demo.

Every command has examples in its `--help`. Method options: `--method NAME` plus `--opt key=value`
(repeatable; values parse as int / float / bool / None / fraction 1/7 / list a,b), and `--keep F` for the
method's main keep fraction (`keep`, or AIM's `merge_keep`).
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from leanvlm.cli.common import (
    BUNDLED_NAMES,
    CLIError,
    build_method,
    check_at_least,
    check_output_file,
    check_question,
    console,
    describe_method,
    dump_json,
    fail,
    fmt_ratio,
    load_model,
    method_names,
    method_options_dict,
    parse_opts,
    parse_ratios,
    run_length,
)

app = typer.Typer(
    name="leanvlm",
    help="Fewer visual tokens for multimodal LLMs: merge before the LLM, prune inside it.\n\n"
         "Methods: `leanvlm doctor` lists them (aim, itp, fastv, visionzip, divprune, cdpruner, ...).",
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# ---------------------------------------------------------------------------------------------- options
MethodOpt = typer.Option("aim", "--method", "-m", help="Method name (registry), or 'none' for the plain model.")
OptsOpt = typer.Option(None, "--opt", "-o", help="Method option key=value (repeatable), e.g. --opt merge_keep=0.25 --opt l1=10.")
KeepOpt = typer.Option(None, "--keep", help="Shortcut for the method's keep fraction (keep, or AIM's merge_keep).")
ModelOpt = typer.Option(None, "--model", help="from_pretrained hub id or directory, 'bundled' or 'bundled-video' (default: the bundled real model; for a video, the bundled video model).")
DeviceOpt = typer.Option(None, "--device", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu).")
DtypeOpt = typer.Option("auto", "--dtype", help="auto, float32, bfloat16, float16.")


def _examples(*lines: str) -> str:
    return "[bold]Examples[/bold]\n\n" + "\n\n".join(f"[cyan]$ {line}[/cyan]" for line in lines)


def _reflow(fn):
    """Join the lines of each docstring paragraph (rich help keeps source line breaks)."""
    if fn.__doc__:
        paragraphs = inspect.cleandoc(fn.__doc__).split("\n\n")
        fn.__doc__ = "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)
    return fn


#: `--debug` anywhere on the command line (see `main`): errors show their traceback instead of one line
DEBUG = False


def _guard(fn):
    """Turn any error into one red line and exit code 2 (130 on Ctrl-C); `--debug` re-raises instead."""
    import functools

    _reflow(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except CLIError as error:
            if DEBUG:
                raise
            raise fail(str(error)) from None
        except KeyboardInterrupt:
            if DEBUG:
                raise
            fail("interrupted")
            raise typer.Exit(code=130) from None
        except Exception as error:  # noqa: BLE001 - a CLI user gets one line, not a traceback
            if DEBUG:
                raise
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise fail(f"{type(error).__name__}: {message} (run with --debug for the traceback)") from None

    return wrapper


def _sample_report(stats: Any) -> dict[str, Any]:
    sample = stats.samples[0]
    return {
        "visual_in": sample.visual_in,
        "visual_into_llm": sample.visual_into_llm,
        "layer_tokens": sample.layer_tokens,
        "layer_visual_tokens": sample.layer_visual_tokens,
        "base_tflops": sample.base_flops / 1e12,
        "method_tflops": sample.method_flops / 1e12,
        "flops_ratio": sample.flops_ratio,
        "reduction_seconds": stats.reduction_seconds,
    }


def _generate(loaded: Any, method: Any, media: Any, question: str, max_new_tokens: int) -> tuple[str, Any, float]:
    """Answer with `method` (None: plain model, measured with an empty Compose). -> (answer, stats, seconds)."""
    import torch

    from leanvlm.hub import build_inputs
    from leanvlm.methods.base import Compose

    parameter = next(loaded.model.parameters())
    inputs = build_inputs(loaded.processor, [media], [question], parameter.device, parameter.dtype)
    applied = method if method is not None else Compose()
    start = time.perf_counter()
    with torch.no_grad(), applied.apply(loaded.model):
        out = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    seconds = time.perf_counter() - start
    tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    return text, applied.stats, seconds


def _drop_layers(method: Any, num_layers: int, kind: str) -> list[int]:
    """The decoder layers after which the method's in-LLM stages drop tokens on a model of this depth, for
    inputs of this kind ("image" / "video": AIM's window depends on it)."""
    if method is None:
        return []
    return sorted({layer for stage in method.stages()[1] for layer in stage.for_kind(kind).layers(num_layers)})


def _spans(layers: list[int]) -> str:
    """[3, 4, 5, 9] -> "3-5, 9"."""
    spans, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            spans.append(str(start) if start == layer else f"{start}-{layer}")
            start = None
    return ", ".join(spans)


def _print_reduction(report: dict[str, Any], title: str) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("visual tokens", f"{report['visual_in']} out of the projector -> {report['visual_into_llm']} into the LLM")
    if report.get("drop_layers"):
        table.add_row("drops inside the LLM", f"after decoder layers {_spans(report['drop_layers'])} "
                                              f"(of {len(report['layer_tokens'])}, 0-indexed)")
    table.add_row("visual tokens per layer", run_length(report["layer_visual_tokens"]))
    table.add_row("all tokens per layer", run_length(report["layer_tokens"]))
    saved = 1 - report["method_tflops"] / report["base_tflops"] if report["base_tflops"] else 0.0
    table.add_row("prefill FLOPs (LLM, analytic)",
                  f"{report['method_tflops'] * 1e3:.4g} GFLOPs vs {report['base_tflops'] * 1e3:.4g} GFLOPs plain: "
                  f"{fmt_ratio(report['flops_ratio'])} fewer ({saved:.1%} saved)")
    console.print(table)


# -------------------------------------------------------------------------------------------------- run
@app.command(epilog=_examples(
    'leanvlm run cat.png "what color is the shape?"',
    'leanvlm run cat.png "what color is the shape?" --method fastv --opt layer=1 --keep 0.5',
    'leanvlm run clip.mp4 "what happens?" --model llava-hf/llava-onevision-qwen2-0.5b-ov-hf --frames 16 --json',
))
@_guard
def run(
    media: Path = typer.Argument(..., help="Image or video file (mp4/avi/mov/mkv/webm need PyAV; GIF works as is)."),
    question: str = typer.Argument(..., help="The question."),
    method: str = MethodOpt,
    opt: Optional[list[str]] = OptsOpt,
    keep: Optional[float] = KeepOpt,
    model: Optional[str] = ModelOpt,
    frames: int = typer.Option(8, "--frames", help="Video frames sampled uniformly."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Answer length limit."),
    device: Optional[str] = DeviceOpt,
    dtype: str = DtypeOpt,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Answer a question about an image or a video with a method applied (default: AIM on the bundled model)."""
    from leanvlm.hub import load_media

    check_question(question)
    check_at_least("--frames", frames)
    check_at_least("--max-new-tokens", max_new_tokens)
    chosen = build_method(method, opt, keep)
    media_item = load_media(media, frames)  # before the model: a bad file is reported at once
    loaded = load_model(model, device, dtype, video=media_item[0] == "video")
    text, stats, seconds = _generate(loaded, chosen, media_item, question, max_new_tokens)
    report = {"answer": text, "method": method, "method_repr": describe_method(chosen),
              "options": method_options_dict(chosen), "model": loaded.name, "media": str(media),
              "kind": media_item[0], "seconds": seconds, **_sample_report(stats),
              "drop_layers": _drop_layers(chosen, len(stats.samples[0].layer_tokens), media_item[0])}
    if json_out:
        dump_json(report)
        return
    console.print(Panel(escape(text) or "(empty answer)", title=f"answer ({describe_method(chosen)})", expand=False))
    _print_reduction(report, f"what {method} did (generate took {seconds:.2f} s)")


# ------------------------------------------------------------------------------------------------- eval
@app.command("eval", epilog=_examples(
    "leanvlm eval --dataset easyvqa --method aim --limit 500 --json results/aim.json",
    "leanvlm eval --dataset scenes --method fastv --opt layer=1 --keep 0.25",
    "leanvlm eval --dataset ./my_vqa_dir --method none --limit 100",
))
@_guard
def eval_command(
    dataset: str = typer.Option("easyvqa", "--dataset", "-d", help="easyvqa, scenes, clips (video), or a directory: images/N.png or videos/N/ | videos/N.gif + questions.json."),
    method: str = MethodOpt,
    opt: Optional[list[str]] = OptsOpt,
    keep: Optional[float] = KeepOpt,
    limit: Optional[int] = typer.Option(None, "--limit", "-n", help="Evaluate the first N items."),
    split: str = typer.Option("test", "--split", help="Dataset split (easyvqa, scenes)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Questions per batch (whole image groups; a larger group is one batch). Default: 64 for the bundled models, 32 for others."),
    mode: str = typer.Option("auto", "--mode", help="closed (bundled model: closed answer set, one forward), generate, or auto."),
    processes: int = typer.Option(1, "--processes", "-p", help="Local processes to shard the items over (results gathered)."),
    model: Optional[str] = ModelOpt,
    device: Optional[str] = DeviceOpt,
    dtype: str = DtypeOpt,
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the result object to this file ('-': stdout)."),
) -> None:
    """Accuracy, visual tokens and prefill FLOPs of a method on a VQA dataset.

    Prints accuracy, mean visual tokens into the LLM, mean analytic LLM prefill FLOPs and the ratio full /
    method; --json FILE writes them as one object (accuracy, n, flops_ratio, visual_tokens, ...).
    """
    from leanvlm.cli.eval import evaluate, evaluate_processes, is_video, load_items

    check_at_least("--limit", limit)
    check_at_least("--batch-size", batch_size)
    check_at_least("--processes", processes)
    check_output_file(json_path, "--json")
    if batch_size is None:
        # the bundled 135M models batch cheaply (64: 6-11% faster than 32 on easy-VQA, 2 processes); a large
        # model's KV cache for 64 prompts would not fit most accelerators
        batch_size = 64 if model in BUNDLED_NAMES else 32
    chosen = build_method(method, opt, keep)
    if processes > 1:
        result = evaluate_processes(dataset, limit, split, model, chosen, processes, batch_size, mode, device=device,
                                    dtype=dtype, description=f"{method} on {dataset}")
        name = "bundled real model" if model in BUNDLED_NAMES else model
    else:
        items = load_items(dataset, limit, split)
        loaded = load_model(model, device, dtype, video=is_video(items[0]))
        result = evaluate(loaded, items, chosen, batch_size=batch_size, mode=mode, description=f"{method} on {dataset}")
        name = loaded.name
    result = {"dataset": dataset, "split": split, "model": name, **result, "method": method.strip().lower(),
              "processes": processes}
    if json_path:
        dump_json(result, json_path)
    if json_path == "-":
        return
    table = Table(title=f"{describe_method(chosen)} on {dataset} ({result['n']} questions, {result['mode']} answers)")
    for column in ("accuracy", "visual tokens in -> into LLM", "prefill TFLOPs (method / full)", "FLOPs ratio", "seconds",
                   "questions / s"):
        table.add_column(column, justify="right")
    table.add_row(f"{result['accuracy']:.4f}", f"{result['visual_in']:.1f} -> {result['visual_tokens']:.1f}",
                  f"{result['method_tflops']:.4g} / {result['base_tflops']:.4g}", fmt_ratio(result["flops_ratio"]),
                  f"{result['seconds']:.1f}", f"{result['questions_per_second']:.2f}")
    console.print(table)
    if len(result["per_type"]) > 1:
        console.print("per question type: " + ", ".join(f"{k} {v:.3f}" for k, v in result["per_type"].items()))
    if json_path:
        console.print(f"wrote {json_path}")


# ------------------------------------------------------------------------------------------------ sweep
@app.command(epilog=_examples(
    "leanvlm sweep --dataset easyvqa --limit 300",
    "leanvlm sweep --dataset scenes --methods aim,fastv,visionzip --budgets 1/2,1/4,1/7,1/10",
))
@_guard
def sweep(
    dataset: str = typer.Option("easyvqa", "--dataset", "-d", help="easyvqa, scenes, clips, or a directory (see eval)."),
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma-separated method names (default: all registered)."),
    budgets: str = typer.Option("1/2,1/4,1/7,1/10", "--budgets", help="Prefill FLOPs budgets as fractions of the full model."),
    limit: Optional[int] = typer.Option(200, "--limit", "-n", help="Items per run."),
    split: str = typer.Option("test", "--split"),
    batch_size: int = typer.Option(8, "--batch-size", "-b"),
    mode: str = typer.Option("auto", "--mode", help="closed, generate or auto (see eval)."),
    model: Optional[str] = ModelOpt,
    device: Optional[str] = DeviceOpt,
    dtype: str = DtypeOpt,
    out: Path = typer.Option(Path("runs"), "--out",
                             help="Directory for sweep-<dataset>.{md,json,png} (default ./runs, so the committed "
                                  "benchmarks/results are never overwritten by accident)."),
) -> None:
    """Every method at several FLOPs budgets: markdown table, JSON and Pareto plot.

    Each method's knobs are set from a visual-token budget searched so that its analytic prefill FLOPs hit
    the target for this dataset's prompt shape; the table reports the measured ratio. Files:
    OUT/sweep-DATASET.md, .json and .png (accuracy vs FLOPs reduction).
    """
    from leanvlm.cli.eval import (
        BUDGET_TOLERANCE,
        analytic_ratio,
        evaluate,
        is_video,
        load_items,
        markdown_table,
        method_for_flops,
        progress_bar,
        prompt_shape,
    )
    from leanvlm.viz import pareto_figure, save_png

    check_at_least("--limit", limit)
    check_at_least("--batch-size", batch_size)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {str(out)!r} is a file; give a directory")
    from leanvlm.methods.registry import has_budget_mapping, make_method

    names = [m.strip() for m in methods.split(",")] if methods else method_names()
    unknown = [n for n in names if n.lower() not in method_names()]
    if unknown:
        raise CLIError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(method_names())}")
    targets = parse_ratios(budgets)
    items = load_items(dataset, limit, split)
    frames = len(items[0].frames) if is_video(items[0]) else 1
    loaded = load_model(model, device, dtype, video=frames > 1 or is_video(items[0]))
    visual, text = prompt_shape(loaded, items[0])
    plan, skipped = [], []
    for name in names:
        if not has_budget_mapping(name):  # input-dependent budget (ITP): one run at its defaults
            chosen = make_method(name)
            plan.append((name, None, chosen, None, analytic_ratio(chosen, loaded.model.config, visual, text, frames)))
            continue
        for target in targets:
            chosen, budget, achieved = method_for_flops(name, target, loaded.model.config, visual, text, frames=frames)
            if chosen is None:
                skipped.append({"method": name, "target": target, "closest_ratio": achieved})
            else:
                plan.append((name, target, chosen, budget, achieved))
    rows: list[dict[str, Any]] = []
    with progress_bar() as bar:
        runs = bar.add_task("sweep", total=len(plan) + 1, info="")
        baseline = evaluate(loaded, items, None, batch_size, mode, progress=bar, description="none (plain)")
        baseline.update(target=None)
        bar.advance(runs)
        for name, target, chosen, budget, achieved in plan:
            at = "defaults" if target is None else f"1/{1 / target:.3g}"
            row = evaluate(loaded, items, chosen, batch_size, mode, progress=bar, description=f"{name} @ {at}")
            row.update(method=name, target=target, visual_budget=budget, planned_ratio=achieved)
            rows.append(row)
            bar.update(runs, advance=1, info=f"{name}: acc {row['accuracy']:.3f} at {row['flops_ratio']:.2f}x")
    stem = f"sweep-{Path(dataset).name if os.path.isdir(dataset) else dataset}"
    out.mkdir(parents=True, exist_ok=True)
    result = {"dataset": dataset, "split": split, "n": len(items), "model": loaded.name,
              "prompt_visual_tokens": visual, "prompt_text_tokens": text, "frames": frames, "baseline": baseline, "rows": rows,
              "skipped": skipped}
    dump_json(result, str(out / f"{stem}.json"))
    title = f"Sweep on {dataset} ({len(items)} questions, {loaded.name})"
    table_md = markdown_table(rows, baseline, title)
    if skipped:
        table_md += f"\nNot reachable within {BUDGET_TOLERANCE:.0%} of the target: " + ", ".join(
            f"{s['method']} @ 1/{1 / s['target']:.3g}" for s in skipped) + "\n"
    (out / f"{stem}.md").write_text(table_md)
    save_png(pareto_figure(rows, title=title, baseline=baseline["accuracy"]), out / f"{stem}.png")
    table = Table(title=title)
    for column in ("method", "target", "configuration", "accuracy", "visual tokens", "FLOPs ratio"):
        table.add_column(column, justify="left" if column in ("method", "configuration") else "right")
    for row in [baseline, *rows]:
        target = "-" if row.get("target") is None else f"1/{1 / row['target']:.3g}"
        table.add_row(row["method"], target, row["method_repr"], f"{row['accuracy']:.3f}",
                      f"{row['visual_tokens']:.1f}", fmt_ratio(row["flops_ratio"]))
    console.print(table)
    if skipped:
        console.print(f"not reachable within {BUDGET_TOLERANCE:.0%} of the target: "
                      + ", ".join(f"{s['method']} @ 1/{1 / s['target']:.3g}" for s in skipped))
    console.print(f"wrote {out / stem}.md, .json, .png")


# ------------------------------------------------------------------------------------------------ bench
def _find_bench_script() -> Path | None:
    here = Path(__file__).resolve()
    for base in (Path.cwd(), *here.parents):
        candidate = base / "benchmarks" / "bench_speed.py"
        if candidate.is_file():
            return candidate
    return None


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, epilog=_examples(
    "leanvlm bench", "leanvlm bench -- --help"))
@_guard
def bench(ctx: typer.Context) -> None:
    """Run the speed benchmark (benchmarks/bench_speed.py's main); extra arguments are passed through."""
    script = _find_bench_script()
    if script is None:
        raise fail("benchmarks/bench_speed.py was not found (run from the leanvlm repository checkout; the speed "
                   "benchmark ships with the repository, not the wheel)")
    spec = importlib.util.spec_from_file_location("leanvlm_bench_speed", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    main = getattr(module, "main", None)
    if main is None:
        raise fail(f"{script} has no main()")
    args = list(ctx.args)
    old, sys.argv = sys.argv, [str(script), *args]  # as if run as `python benchmarks/bench_speed.py ARGS`
    try:
        result = main(args) if inspect.signature(main).parameters else main()
    finally:
        sys.argv = old
    if isinstance(result, int) and result:
        raise typer.Exit(code=result)


# ------------------------------------------------------------------------------------------------ flops
@app.command(epilog=_examples(
    "leanvlm flops --preset llava-onevision-7b --frames 32 --method aim --json",
    "leanvlm flops --preset llava-onevision-7b --frames 32 --method aim --opt accounting=paper",
    "leanvlm flops --preset llava-1.5-7b --image --method fastv --opt layer=1 --keep 0.5",
    "leanvlm flops --config path/to/config.json --image --method visionzip --keep 0.25",
))
@_guard
def flops(
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="A preset name (see `leanvlm flops --list`)."),
    config: Optional[Path] = typer.Option(None, "--config", help="A model's config.json instead of a preset."),
    frames: Optional[int] = typer.Option(None, "--frames", help="Video frames (default: the preset's, if it does video)."),
    image: bool = typer.Option(False, "--image", help="One image (or --images N crops) instead of video."),
    images: int = typer.Option(1, "--images", help="Images / crops with --image."),
    text_tokens: Optional[int] = typer.Option(None, "--text-tokens", help="Non-visual prompt tokens (default: the preset's)."),
    visual_tokens: Optional[int] = typer.Option(None, "--visual-tokens", help="Visual tokens per frame / image override."),
    method: str = typer.Option("aim", "--method", "-m", help="Calculator method (none, aim, merge, prune, fastv) or any registered method."),
    opt: Optional[list[str]] = OptsOpt,
    keep: Optional[float] = KeepOpt,
    list_presets: bool = typer.Option(False, "--list", help="List the presets and exit."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Analytic prefill FLOPs of a model (preset or config.json) with and without a method.

    No model is loaded. Calculator methods (none, aim, merge, prune, fastv) take the calculator's options
    (e.g. --opt accounting=paper); any other registered method is costed from its stages' plans.
    """
    from leanvlm import flops as F

    if list_presets:
        if json_out:
            dump_json({name: p.note for name, p in F.PRESETS.items()})
            return
        table = Table("preset", "note", title="FLOPs presets")
        for name, p in F.PRESETS.items():
            table.add_row(name, p.note)
        console.print(table)
        return
    if (preset is None) == (config is None):
        raise CLIError("give exactly one of --preset NAME or --config FILE")
    if config is not None and not config.is_file():
        raise CLIError(f"--config {str(config)!r} is not a file")
    if frames is not None and image:
        raise CLIError("give --frames or --image, not both")
    options = parse_opts(opt)
    name = method.strip().lower()
    if name in F.METHODS:
        if keep is not None:
            options.setdefault("merge_keep" if name in ("aim", "merge") else "keep", keep)
        target: Any = name
    else:
        target = build_method(method, opt, keep)
        options = {}
    try:
        report = F.flops(str(config) if config is not None else preset, frames=frames, image=image, images=images,
                         text_tokens=text_tokens, visual_tokens_per_frame=visual_tokens, method=target, **options)
    except TypeError as error:
        known = [p for p in inspect.signature(F.METHODS[name]).parameters if p != "w"] if isinstance(target, str) else []
        raise CLIError(f"{error}; the calculator's {name!r} takes: {', '.join(known) or 'no options'}") from error
    except KeyError as error:  # a config.json without a field the calculator needs
        source = f"--config {str(config)!r}" if config is not None else f"--preset {preset!r}"
        raise CLIError(f"{source}: {error.args[0]}") from error
    data = report.to_dict()
    if json_out:
        dump_json(data)
        return
    unit = f"{report.frames} frames" if report.mode == "video" else f"{report.images} image(s)"
    table = Table(title=f"{report.model}: {unit}, {report.visual_tokens} visual + {report.text_tokens} text tokens, "
                        f"method {report.method}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("LLM prefill, full model", f"{report.base_tflops:.3f} TFLOPs")
    table.add_row("LLM prefill, with method", f"{report.method_tflops:.3f} TFLOPs")
    table.add_row("ratio (full / method)", fmt_ratio(report.ratio))
    table.add_row("vision encoder + projector", f"{report.vision_tflops:.3f} TFLOPs")
    table.add_row("method overhead", f"{report.overhead_tflops:.4f} TFLOPs")
    table.add_row("total (LLM + vision + overhead)", f"{report.total_base_tflops:.3f} -> {report.total_method_tflops:.3f} TFLOPs")
    console.print(table)
    console.print(f"tokens per layer: {run_length(report.per_layer_tokens)}")


# ------------------------------------------------------------------------------------------------- show
@app.command(epilog=_examples(
    "leanvlm show cat.png --method aim --out aim.png",
    "leanvlm show cat.png --method visionzip --keep 0.25 --out vz.png",
    "leanvlm show clip.gif --method aim --frames 4 --out video.png --model llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
))
@_guard
def show(
    media: Path = typer.Argument(..., help="Image or video file."),
    out: Path = typer.Option(Path("leanvlm-show.png"), "--out", help="PNG to write."),
    method: str = MethodOpt,
    opt: Optional[list[str]] = OptsOpt,
    keep: Optional[float] = KeepOpt,
    question: str = typer.Option("what color is the shape?", "--question", "-q", help="The prompt's question."),
    model: Optional[str] = ModelOpt,
    frames: int = typer.Option(4, "--frames", help="Video frames sampled uniformly."),
    dpi: int = typer.Option(100, "--dpi"),
    device: Optional[str] = DeviceOpt,
    dtype: str = DtypeOpt,
    json_out: bool = typer.Option(False, "--json", help="Also print the counts as one JSON object."),
) -> None:
    """Picture of what a method did to an image or video (PNG).

    Every patch of every image / frame: kept, merged (colour = merge group) or dropped before the LLM,
    and the tokens each LLM decoder layer computed on.
    """
    from leanvlm.cli.show import render_show
    from leanvlm.hub import load_media

    check_question(question)
    check_at_least("--frames", frames)
    if not 20 <= dpi <= 600:
        raise CLIError(f"--dpi must be in [20, 600], got {dpi}")
    check_output_file(out, "--out")
    chosen = build_method(method, opt, keep)
    media_item = load_media(media, frames)
    loaded = load_model(model, device, dtype)
    text, stats, _ = _generate(loaded, chosen, media_item, question, max_new_tokens=8)
    counts = render_show(loaded, chosen, method, media_item, stats, out, dpi)
    if json_out:
        dump_json({"out": str(out), "answer": text, **counts, **_sample_report(stats)})
        return
    console.print(f"wrote {out} ({counts['width']}x{counts['height']} px): {counts['visual_in']} visual tokens -> "
                  f"{counts['visual_into_llm']} into the LLM; answer: {text!r}")


# ----------------------------------------------------------------------------------------------- doctor
@app.command(epilog=_examples("leanvlm doctor", "leanvlm doctor --json"))
@_guard
def doctor(json_out: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Check the environment and say what is unsupported.

    torch / transformers versions against the tested range, attention backends, devices, the bundled real
    model's wheels, supported model families, methods, the lmms-eval plugin. Exit code 1 when torch or
    transformers is outside the tested range.
    """
    from leanvlm.cli.doctor import collect, render

    report = collect()
    if json_out:
        dump_json(report)
    else:
        render(report)
    if not report["ok"]:
        raise typer.Exit(code=1)


# ------------------------------------------------------------------------------------------------- demo
@app.command(epilog=_examples("leanvlm demo", "leanvlm demo --question 'how many shapes are there?' --json",
                               "leanvlm demo --video"))
@_guard
def demo(
    image: Optional[Path] = typer.Option(None, "--image", help="Image (default: the bundled one in real_model/assets)."),
    question: Optional[str] = typer.Option(None, "--question", "-q", help="Question (default: the bundled one)."),
    video: bool = typer.Option(False, "--video", help="The bundled video model on the bundled clip instead."),
    opt: Optional[list[str]] = OptsOpt,
    max_new_tokens: int = typer.Option(8, "--max-new-tokens"),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """What `make demo` runs: the bundled model, plain and with AIM, on the bundled image (or clip).

    Prints both answers, the visual tokens kept (in -> into the LLM, per layer) and the prefill FLOPs saved.
    """
    from leanvlm.cli.show import demo_clip, demo_image
    from leanvlm.hub import load_media

    if video and image is not None:
        raise CLIError("--image and --video are exclusive (run `leanvlm run CLIP.gif QUESTION` for your own clip)")
    chosen = build_method("aim", opt)
    picture, default_question, source, expected = demo_clip() if video else demo_image()
    if image is not None:
        picture, source, expected = load_media(image)[1], str(image), None
    if question is not None and question != default_question:
        expected = None
    question = question or default_question
    loaded = load_model(None, video=video)
    media = ("video" if video else "image", picture)
    plain_text, plain_stats, plain_seconds = _generate(loaded, None, media, question, max_new_tokens)
    aim_text, aim_stats, aim_seconds = _generate(loaded, chosen, media, question, max_new_tokens)
    report = {"video" if video else "image": source, "question": question, "expected_answer": expected,
              "plain_answer": plain_text,
              "aim_answer": aim_text,
              "method_repr": describe_method(chosen, full=True), "plain_seconds": plain_seconds,
              "aim_seconds": aim_seconds, **_sample_report(aim_stats),
              "drop_layers": _drop_layers(chosen, len(aim_stats.samples[0].layer_tokens), media[0])}
    if json_out:
        dump_json(report)
        return
    truth = f"\n[bold]expected[/bold] {expected}" if expected else ""
    console.print(Panel(f"[bold]{'video' if video else 'image'}[/bold]    {escape(source)}\n"
                        f"[bold]question[/bold] {escape(question)}{truth}\n\n"
                        f"[bold]plain model[/bold] -> {escape(repr(plain_text))}   ({plain_seconds:.2f} s)\n"
                        f"[bold]with AIM[/bold]    -> {escape(repr(aim_text))}   ({aim_seconds:.2f} s)",
                        title=f"leanvlm demo: {loaded.name}", expand=False))
    _print_reduction(report, f"what {describe_method(chosen, full=True)} did")


def main() -> None:  # pragma: no cover - console entry point alternative
    app()


if __name__ == "__main__":  # pragma: no cover
    app()


def main() -> None:
    """The `leanvlm` / `python -m leanvlm` entry point: `--debug` anywhere shows tracebacks."""
    global DEBUG
    if "--debug" in sys.argv[1:]:
        DEBUG = True
        sys.argv = [sys.argv[0], *(a for a in sys.argv[1:] if a != "--debug")]
    app()

"""Cost of the reduction code itself, before vs after a change, measured in ONE process that alternates both.

The baseline is a git revision of this repository, exported with `git archive` and imported as the package
`leanvlm_baseline` (every `leanvlm` name in its sources renamed), so the two versions' hooks are applied to
the same model instance in turn, round after round: a load on the machine hits both alike. Model and
workloads are `bench_speed.py`'s (LLaVA-OneVision-0.5B shape, random weights, videos of --frames frames,
~100 text tokens); the vision tower runs once per workload (--cache keeps its outputs for the next run),
and methods that read vision signals get the capture of that forward, as in bench_speed.

Per workload, method and version: prefill wall seconds, `stats.reduction_seconds` (wall, what bench_speed's
"reduction %" divides by the prefill), and the CPU milliseconds of the reduction's pieces (all of it, the
pre-LLM stage, the vision signals, the in-LLM scoring, and within it q/k and PageRank), medians of --repeats
rounds after a warm-up round; and whether both versions kept the same tokens before and inside the LLM.

    python benchmarks/bench_reduction.py --baseline a39390a --frames 8 32 --methods aim itp prumerge+ \\
        --threads 1 --cache runs/reduction-workloads
"""

from __future__ import annotations

import argparse
import functools
import importlib
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

sys.path.insert(0, str(Path(__file__).parent))
import bench_speed  # noqa: E402
from leanvlm.cli.common import parse_opts  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "leanvlm_baseline"

#: (module, attribute, piece): the functions whose CPU time is reported, looked up in both versions (a piece a
#: version lacks is reported as 0). "reduction" is the three places the runtime times as reduction_seconds;
#: the others are parts of it.
PIECES = [
    ("runtime.engine", "AppliedMethod._before_multimodal", "reduction"),
    ("runtime.engine", "AppliedMethod._layer_input_hook", "reduction"),
    ("runtime.engine", "AppliedMethod._layer_output_hook", "reduction"),
    ("models.onevision", "OneVisionAdapter.encode_visual", "reduction: vision signals and per-frame items"),
    ("methods.aim", "TokenMerge.reduce", "reduction: pre-LLM stage"),
    ("methods.itp", "InflectionCut.reduce", "reduction: pre-LLM stage"),
    ("methods.prumerge", "OutlierPruneMerge.reduce", "reduction: pre-LLM stage"),
    ("methods.visionzip", "DominantContextual.reduce", "reduction: pre-LLM stage"),
    ("methods.fastvid", "DensityPrune.reduce", "reduction: pre-LLM stage"),
    ("methods.holitom", "HolisticMerge.reduce", "reduction: pre-LLM stage"),
    ("methods.holitom", "SimilarityMerge.merge", "reduction: in-LLM scoring"),
    ("methods.aim", "ProgressivePrune.select", "reduction: in-LLM scoring"),
    ("methods.itp", "TextRelevancePrune.select", "reduction: in-LLM scoring"),
    ("models.base", "ModelAdapter.query_key", "in-LLM scoring: q/k with RoPE"),
    ("methods.aim", "ranking_importance", "in-LLM scoring: PageRank"),
]
#: the hooks the runtime makes per layer: wrap what the factory returns
HOOK_FACTORIES = {"AppliedMethod._layer_input_hook", "AppliedMethod._layer_output_hook"}


def export_baseline(revision: str, folder: Path) -> str:
    """`src/leanvlm` at `revision` -> folder/leanvlm_baseline with every `leanvlm` name renamed; returns the
    revision's commit id. The working tree and the repository are left as they are."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", revision], check=True, capture_output=True,
                            text=True).stdout.strip()
    archive = folder / "baseline.tar"
    with open(archive, "wb") as handle:
        subprocess.run(["git", "-C", str(ROOT), "archive", commit, "src/leanvlm"], check=True, stdout=handle)
    with tarfile.open(archive) as tar:
        tar.extractall(folder, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    package = folder / BASELINE
    (folder / "src" / "leanvlm").rename(package)
    for path in package.rglob("*.py"):
        path.write_text(re.sub(r"\bleanvlm\b", BASELINE, path.read_text()))
    return commit


def _wrap(function, piece: str, cpu: dict[str, float], factory: bool):
    """function, timed into cpu[piece] (for a hook factory: every hook it makes)."""

    def timed(inner):
        @functools.wraps(inner)
        def wrapper(*args, **kwargs):
            start = time.process_time()
            try:
                return inner(*args, **kwargs)
            finally:
                cpu[piece] += time.process_time() - start

        return wrapper

    if not factory:
        return timed(function)

    @functools.wraps(function)
    def make(*args, **kwargs):
        return timed(function(*args, **kwargs))

    return make


def instrument(package: str, cpu: dict[str, float], undo: list[tuple[Any, str, Any]]) -> Any:
    """Import `package` with the PIECES of it timed into cpu; undo collects (owner, name, original) to put back."""
    for module_name, attribute, piece in PIECES:
        owner = importlib.import_module(f"{package}.{module_name}")
        *path, name = attribute.split(".")
        for part in path:
            owner = getattr(owner, part, None)
        if owner is not None and hasattr(owner, name):
            undo.append((owner, name, getattr(owner, name)))
            setattr(owner, name, _wrap(getattr(owner, name), piece, cpu, attribute in HOOK_FACTORIES))
    return importlib.import_module(package)


def workload(model, frames: int, cache: Path | None, tiny: bool) -> dict[str, Any]:
    """bench_speed's video workload: input_ids, the projector features and the vision capture of one forward."""
    path = None if cache is None or tiny else cache / f"video-{frames}f.pt"
    if path is not None and path.exists():
        return torch.load(path)
    from leanvlm.models import get_adapter

    probe = get_adapter(model).install_vision_probe()
    try:
        built = bench_speed.build_workload(model, f"video-{frames}f", frames, *((2, 4) if tiny else ()))
    finally:
        probe.remove()
    data = {"input_ids": built.input_ids, "features": built.encoded["video"].pooler_output, "history": probe.history}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(data, path)
    return data


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """"aim" -> ("aim", {}); "aim:importance=pagerank:merge_pass_fraction=0.5" -> the registry name and its
    options, each value read as `leanvlm eval --opt` reads it (`cli.common.parse_opts`)."""
    name, *pairs = spec.split(":")
    return name, parse_opts(pairs)


def measure(model, package: Any, spec: str, data: dict[str, Any], cpu: dict[str, float]) -> dict[str, Any]:
    """One prefill (as bench_speed times it) under the method `spec` (see `parse_method`) from `package`."""
    name, options = parse_method(spec)
    method = importlib.import_module(f"{package.__name__}.methods.registry").make_method(name, **options)
    applied = method.apply(model)
    if applied._probe is not None:
        applied._probe.history = data["history"]
    kwargs = dict(input_ids=data["input_ids"],
                  mm_encoder_outputs={"video": BaseModelOutputWithPooling(pooler_output=data["features"])})
    try:
        cpu.clear()
        with torch.no_grad():
            start = time.perf_counter()
            model(**kwargs, use_cache=True, logits_to_keep=1)
            prefill = time.perf_counter() - start
        session = applied.session
        kept = {"pre-LLM": None if session.shrunk is None else session.shrunk.kept.clone(),
                **{f"after layer {layer}": slots.clone() for layer, slots in session.decisions.items()}}
    finally:
        applied.remove()
    return {"prefill": prefill, "reduction": method.stats.reduction_seconds, "cpu": dict(cpu), "kept": kept}


def same_tokens(a: dict[str, torch.Tensor | None], b: dict[str, torch.Tensor | None]) -> bool:
    """Whether two runs kept the same slots at every stage (None: that stage kept everything)."""
    if a.keys() != b.keys():
        return False
    return all((a[k] is None and b[k] is None) or (a[k] is not None and b[k] is not None and torch.equal(a[k], b[k]))
               for k in a)


def report(frames: int, name: str, runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    before, after = runs["before"], runs["after"]
    lines = [f"video-{frames}f, {name}: the same tokens kept before and inside the LLM: "
             f"{same_tokens(before[-1]['kept'], after[-1]['kept'])}", "",
             "| | before | after |", "|---|---|---|"]

    def row(label: str, value, digits: int) -> None:
        lines.append(f"| {label} | {statistics.median(value(r) for r in before):.{digits}f} "
                     f"| {statistics.median(value(r) for r in after):.{digits}f} |")

    row("prefill s (wall)", lambda r: r["prefill"], 3)
    row("reduction s (wall, stats.reduction_seconds)", lambda r: r["reduction"], 3)
    row("reduction % of the prefill", lambda r: 100 * r["reduction"] / r["prefill"], 2)
    for piece in dict.fromkeys(piece for _, _, piece in PIECES):
        if any(piece in r["cpu"] for r in before + after):
            row(f"{piece} ms (CPU)", lambda r, piece=piece: 1000 * r["cpu"].get(piece, 0.0), 1)
    return lines + [""]


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="git revision to compare this tree with")
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--methods", nargs="+", default=["aim", "aim:importance=pagerank", "itp", "prumerge+"],
                        help="registry names, each optionally with options: NAME:key=value:key=value")
    parser.add_argument("--repeats", type=int, default=3, help="measured rounds after one warm-up round")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--cache", type=Path, default=None, help="folder keeping the vision outputs of each workload")
    parser.add_argument("--tiny", action="store_true", help="tiny config smoke run")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu: dict[str, float] = defaultdict(float)
    undo: list[tuple[Any, str, Any]] = []
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as folder:
        commit = export_baseline(args.baseline, Path(folder))
        sys.path.insert(0, folder)
        try:
            versions = {"before": instrument(BASELINE, cpu, undo), "after": instrument("leanvlm", cpu, undo)}
            model = bench_speed.build_model(args.tiny)
            lines.append(f"before: {args.baseline} ({commit[:10]}); after: this tree; torch {torch.__version__}, "
                         f"{torch.get_num_threads()} threads; medians of {args.repeats} alternating rounds")
            lines.append("")
            for frames in args.frames:
                data = workload(model, frames, args.cache, args.tiny)
                for name in args.methods:
                    runs: dict[str, list[dict[str, Any]]] = {version: [] for version in versions}
                    for round_ in range(args.repeats + 1):  # round 0 warms up
                        for version, package in versions.items():
                            result = measure(model, package, name, data, cpu)
                            if round_:
                                runs[version].append(result)
                    lines += report(frames, name, runs)
        finally:  # this process's leanvlm as it was, and no baseline left importable
            for owner, name, original in reversed(undo):
                setattr(owner, name, original)
            sys.path.remove(folder)
            for module in [m for m in sys.modules if m == BASELINE or m.startswith(BASELINE + ".")]:
                del sys.modules[module]
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()

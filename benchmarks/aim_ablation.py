"""AIM ablation on the bundled real model, on held-out data no configuration was tuned on.

Data: `fresh_easyvqa(IMAGES, seed)` (newly drawn easy-VQA-style images, 4 questions each) and
`scenes("heldout", SCENES, seed)` (our generated scenes from a stream separate from train and test).
Every configuration is scored closed-set (`score_answers`, one forward per batch) on the same items; the
FLOPs ratio is the analytic LLM prefill ratio the method reports (mean over batches).

    python benchmarks/aim_ablation.py --out benchmarks/results          # every configuration, seed 0
    python benchmarks/aim_ablation.py --configs default,pagerank --seed 1
Results are merged into OUT/aim-ablation.{json,md} (default ./runs) by configuration name.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import leanvlm
from leanvlm.methods.aim import ProgressivePrune, TokenMerge
from leanvlm.ops.schedule import default_prune_layers
from leanvlm.real_model import load_real_model
from leanvlm.real_model.data import fresh_easyvqa, scenes
from leanvlm.real_model.evaluate import evaluate

#: The bundled image model's LLM depth (SmolLM2-135M) and the SPEC's pruning window for it, 15-23: every row
#: measured before the per-modality defaults ran with it and merged to 25% (`spec_aim`).
BUNDLED_LAYERS = 30
SPEC_WINDOW = default_prune_layers(BUNDLED_LAYERS, "video")


def spec_aim(**options) -> leanvlm.AIM:
    """AIM with the SPEC's defaults (merge to 25%, the SPEC window): what `AIM()` was before images got theirs."""
    return leanvlm.AIM(**{"merge_keep": 0.25, "l1": SPEC_WINDOW[0], "l2": SPEC_WINDOW[1], **options})


#: The LLM input every row before the original-positions / proportional-attention change was measured with:
#: merged tokens at contiguous positions, attended as one token each.
CONTIGUOUS = dict(original_positions=False, proportional_attention=False)

#: name -> (description, factory). None = the plain model. "published" = the SPEC / published merge schedule
#: (each pass removes up to half of the tokens: 256 -> 128 -> 64); AIM()'s image default merges at most a
#: quarter per pass (256 -> 192 -> 144 -> 108 -> 81 -> 64).
CONFIGS: dict[str, tuple[str, Callable[[], leanvlm.Method] | None]] = {
    "plain": ("no reduction", None),
    "before": ("previous default: published schedule, float32 PageRank (underflow ties)",
               lambda: leanvlm.Compose(pre=[TokenMerge(0.25, pass_fraction=0.5, **CONTIGUOUS)],
                                       llm=[ProgressivePrune(*SPEC_WINDOW, exact_ranking=False)])),
    "published_exact": ("published schedule, underflow-free PageRank",
                        lambda: spec_aim(merge_pass_fraction=0.5, importance="pagerank", **CONTIGUOUS)),
    "published_merge_only": ("published schedule, merge only", lambda: spec_aim(prune=False, merge_pass_fraction=0.5, **CONTIGUOUS)),
    "prune_only": ("prune only: AIM(merge_keep=1.0, importance='pagerank')",
                   lambda: spec_aim(merge_keep=1.0, importance="pagerank", **CONTIGUOUS)),
    "published_text": ("published schedule, importance='text'",
                       lambda: spec_aim(importance="text", merge_pass_fraction=0.5, **CONTIGUOUS)),
    "published_key_merge_only": ("published schedule, key metric, merge only",
                                 lambda: spec_aim(prune=False, merge_metric="key", merge_pass_fraction=0.5, **CONTIGUOUS)),
    "published_key": ("published schedule, key metric",
                      lambda: spec_aim(merge_metric="key", merge_pass_fraction=0.5, importance="pagerank", **CONTIGUOUS)),
    "merge_only": ("AIM(prune=False): quarter-per-pass merge only", lambda: spec_aim(prune=False, **CONTIGUOUS)),
    "key_merge_only": ("AIM(prune=False, merge_metric='key')", lambda: spec_aim(prune=False, merge_metric="key", **CONTIGUOUS)),
    "tenth_key_merge_only": ("AIM(prune=False, merge_metric='key', merge_pass_fraction=0.1)",
                             lambda: spec_aim(prune=False, merge_metric="key", merge_pass_fraction=0.1, **CONTIGUOUS)),
    "pagerank": ("AIM(importance='pagerank'): quarter-per-pass merge + underflow-free PageRank",
                 lambda: spec_aim(importance="pagerank", **CONTIGUOUS)),
    "key": ("AIM(merge_metric='key', importance='pagerank')", lambda: spec_aim(merge_metric="key", importance="pagerank", **CONTIGUOUS)),
    "default_contiguous": ("previous AIM() default: quarter-per-pass merge + text importance, contiguous positions, "
                           "no size bias", lambda: spec_aim(**CONTIGUOUS)),
    "late_prune": ("AIM(l1=18, l2=26): default merge, pruning 3 layers later",
                   lambda: spec_aim(l1=18, l2=26, **CONTIGUOUS)),
    "merge30_prune12": ("AIM(merge_keep=0.3, l1=12, l2=24): lighter merge, earlier pruning",
                        lambda: spec_aim(merge_keep=0.3, l1=12, l2=24, **CONTIGUOUS)),
    "merge35_prune10": ("AIM(merge_keep=0.35, l1=10, l2=20): lighter merge, earlier pruning",
                        lambda: spec_aim(merge_keep=0.35, l1=10, l2=20, **CONTIGUOUS)),
    "merge_positions": ("AIM(prune=False, proportional_attention=False): merge only, original positions",
                        lambda: spec_aim(prune=False, proportional_attention=False)),
    "merge_proportional": ("AIM(prune=False, original_positions=False): merge only, proportional attention",
                           lambda: spec_aim(prune=False, original_positions=False)),
    "merge_now": ("AIM(prune=False): merge only, original positions + proportional attention",
                  lambda: spec_aim(prune=False)),
    "spec_biased_rank": ("SPEC schedule: merge to 25% (original positions, proportional attention) + text-importance "
                         "pruning after layers 15-23 ranked by the attention the model paid (size bias included)",
                         lambda: spec_aim()),
    "spec_unbiased_rank": ("previous AIM() default: the SPEC schedule, pruning ranked by the unbiased attention",
                           lambda: leanvlm.Compose(pre=[TokenMerge(0.25)],
                                                   llm=[ProgressivePrune(*SPEC_WINDOW, size_biased_ranking=False)])),
    "default": ("AIM() default on images: merge to 20% + pruning after layers 18-25 (= merge20_prune18)",
                lambda: leanvlm.AIM()),
    "merge20_only": ("AIM(merge_keep=0.2, prune=False): merge only, to 20%", lambda: leanvlm.AIM(merge_keep=0.2, prune=False)),
    "merge20_late": ("AIM(merge_keep=0.2, l1=24, l2=30): merge to 20%, pruning in the last 6 layers",
                     lambda: leanvlm.AIM(merge_keep=0.2, l1=24, l2=30)),
    "merge20_prune18": ("AIM(merge_keep=0.2, l1=18, l2=26): merge to 20%, pruning layers 18-25 (AIM() on images now)",
                        lambda: leanvlm.AIM(merge_keep=0.2, l1=18, l2=26)),
    "visionzip": ("VisionZip()", lambda: leanvlm.VisionZip()),
    "itp": ("ITP()", lambda: leanvlm.ITP()),
}


def run(model, processor, name: str, items: list, batch_size: int) -> dict:
    factory = CONFIGS[name][1]
    method = factory() if factory is not None else None
    result = evaluate(model, processor, items, batch_size=batch_size, method=method, progress=False)
    stats = result.pop("stats", None)
    result["flops_ratio"] = statistics.mean(s.flops_ratio for s in stats) if stats else 1.0
    return result


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "aim-ablation.json").write_text(json.dumps(results, indent=2))
    lines = ["| configuration | fresh easy-VQA | scenes (held out) | count | position | FLOPs ratio |",
             "|---|---|---|---|---|---|"]
    for name, row in results["configs"].items():
        easy, scene = row["easyvqa"], row["scenes"]
        lines.append(f"| {row['description']} | {easy['accuracy']:.3f} | {scene['accuracy']:.3f} | "
                     f"{scene['per_type'].get('count', float('nan')):.3f} | {scene['per_type'].get('position', float('nan')):.3f} | "
                     f"{easy['flops_ratio']:.2f}x |")
    header = (f"Held-out data: {results['easyvqa_n']} questions on {results['images']} fresh easy-VQA-style images "
              f"(seed {results['seed']}) and {results['scenes_n']} questions on {results['scenes']} held-out scenes.\n"
              f"Command: `{results['command']}`\n\n")
    (out / "aim-ablation.md").write_text(header + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names: " + ", ".join(CONFIGS))
    parser.add_argument("--images", type=int, default=60, help="fresh easy-VQA-style images (4 questions each)")
    parser.add_argument("--scenes", type=int, default=60, help="held-out scenes (3-5 questions each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("runs"),
                        help="output directory (default ./runs; the committed tables are in benchmarks/results)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; choose from {', '.join(CONFIGS)}")
    torch.manual_seed(0)
    model, processor = load_real_model()
    easy, scene = fresh_easyvqa(args.images, args.seed), scenes("heldout", args.scenes, args.seed)
    path = args.out / "aim-ablation.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if (results.get("images"), results.get("scenes"), results.get("seed")) != (args.images, args.scenes, args.seed):
        results = {"configs": {}}  # other data: start over
    results.update(images=args.images, scenes=args.scenes, seed=args.seed, easyvqa_n=len(easy), scenes_n=len(scene),
                   command="python benchmarks/aim_ablation.py " + " ".join(sys.argv[1:] if argv is None else argv))
    for name in names:
        start = time.perf_counter()
        row = {"description": CONFIGS[name][0], "easyvqa": run(model, processor, name, easy, args.batch_size),
               "scenes": run(model, processor, name, scene, args.batch_size)}
        results["configs"][name] = row
        print(f"{name:14s} easy {row['easyvqa']['accuracy']:.3f}  scenes {row['scenes']['accuracy']:.3f} "
              f"{row['scenes']['per_type']}  {row['easyvqa']['flops_ratio']:.2f}x  ({time.perf_counter() - start:.0f} s)",
              flush=True)
        write(results, args.out)


if __name__ == "__main__":
    main()

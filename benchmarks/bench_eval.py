"""Evaluation throughput of `leanvlm eval` on the bundled model: the batched defaults (image groups, shared
vision encoding, shared prompt prefix for the plain model) against the previous loop (batches of 8 in
item order, every question's full prompt), interleaved on the same easy-VQA test questions.

    python benchmarks/bench_eval.py --questions 120 --repeats 2 --out benchmarks/results

Writes OUT/eval-throughput.{json,md}: seconds per question of each path (median over repeats, the runs
alternate), the speedup measured in this one run, and the extrapolation to the full test split (9,673
questions), which is linear in the number of questions (every image has ~9.7 questions).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

FULL_SPLIT = 9673


def main(argv: list[str] | None = None) -> None:
    from leanvlm.cli.common import load_model
    from leanvlm.cli.eval import evaluate, load_items
    from leanvlm.methods.registry import make_method

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=120, help="first N easy-VQA test questions")
    parser.add_argument("--methods", nargs="+", default=["none", "aim"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_model(None)
    items = load_items("easyvqa", args.questions)
    rows = []
    for name in args.methods:
        method = None if name == "none" else make_method(name)
        runs: dict[str, list[float]] = {"previous": [], "batched": []}
        answers: dict[str, list[str]] = {}
        evaluate(loaded, items[:8], method, progress=False)  # warm-up
        for _ in range(args.repeats):  # interleaved: load on the machine hits both paths alike
            for path, options in (("previous", {"batch_size": 8, "share_images": False, "grouped": False}),
                                  ("batched", {"batch_size": 16, "share_images": True, "grouped": True})):
                start = time.perf_counter()
                result = evaluate(loaded, items, method, batch_size=options["batch_size"], progress=False,
                                  share_images=options["share_images"], group_images=options["grouped"])
                runs[path].append((time.perf_counter() - start) / len(items))
                answers[path] = result["predictions"]
        previous, batched = statistics.median(runs["previous"]), statistics.median(runs["batched"])
        rows.append({"method": name, "questions": len(items), "previous_s_per_question": previous,
                     "batched_s_per_question": batched, "speedup": previous / batched,
                     "same_answers": answers["previous"] == answers["batched"],
                     "full_split_minutes_batched": batched * FULL_SPLIT / 60,
                     "full_split_minutes_previous": previous * FULL_SPLIT / 60, "runs": runs})
        print(json.dumps(rows[-1]), flush=True)
    load = os.getloadavg()
    out = {"threads": args.threads, "load_average_at_end": load, "rows": rows,
           "command": "python benchmarks/bench_eval.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "eval-throughput.json"), "w") as handle:
        json.dump(out, handle, indent=2)
    lines = [f"# leanvlm eval throughput (bundled model, {args.threads} threads, load average {load[0]:.1f} at the end)", "",
             f"`{out['command']}`", "",
             "| method | questions timed | previous s/question | batched s/question | speedup (same run) | same answers | "
             "full test split, batched (extrapolated) |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['method']} | {row['questions']} | {row['previous_s_per_question']:.3f} | "
                     f"{row['batched_s_per_question']:.3f} | {row['speedup']:.2f}x | {row['same_answers']} | "
                     f"{row['full_split_minutes_batched']:.1f} min |")
    with open(os.path.join(args.out, "eval-throughput.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

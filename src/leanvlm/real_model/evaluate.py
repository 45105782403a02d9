"""Closed-set accuracy of the real model, optionally under a leanvlm token-reduction method.

    python -m leanvlm.real_model.evaluate --easyvqa-images 0 --scenes 200 --out metrics.json

(`--easyvqa-images 0` = the full easy-VQA test split: 9,673 questions about 1,000 images.)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Sequence

from tqdm import tqdm
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from leanvlm.real_model import score_answers
from leanvlm.real_model.data import VQAItem


def predict(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    items: Sequence[VQAItem],
    batch_size: int = 8,
    method: Any = None,
    progress: bool = True,
) -> tuple[list[str], list[Any]]:
    """`score_answers` on `items` in batches of `batch_size` (one forward each) -> (one closed-set answer per
    item, in order; the method's stats object of every batch, [] without a method).

    With `method` (leanvlm's API: `with method.apply(model): ...`, then `method.stats`), every batch runs
    under the method.
    """
    predictions: list[str] = []
    stats = []
    for i in tqdm(range(0, len(items), batch_size), desc="evaluate", disable=not progress):
        batch = items[i:i + batch_size]
        images, questions = [it.image for it in batch], [it.question for it in batch]
        if method is None:
            predictions += score_answers(model, processor, images, questions)
        else:
            with method.apply(model):
                predictions += score_answers(model, processor, images, questions)
            stats.append(method.stats)
    return predictions, stats


def evaluate(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    items: Sequence[VQAItem],
    batch_size: int = 8,
    method: Any = None,
    progress: bool = True,
) -> dict:
    """Accuracy of `predict` on `items`. Returns {"accuracy", "n", "per_type": {qtype: accuracy},
    "per_type_n": {qtype: count}, "seconds", and "stats": [per-batch stats] if method}.
    """
    right: dict[str, int] = {}
    count: dict[str, int] = {}
    start = time.perf_counter()
    predictions, stats = predict(model, processor, items, batch_size, method, progress)
    for item, prediction in zip(items, predictions):
        count[item.qtype] = count.get(item.qtype, 0) + 1
        right[item.qtype] = right.get(item.qtype, 0) + int(prediction == item.answer)
    n = sum(count.values())
    result = {
        "accuracy": sum(right.values()) / n if n else float("nan"),
        "n": n,
        "per_type": {k: right[k] / count[k] for k in sorted(count)},
        "per_type_n": dict(sorted(count.items())),
        "seconds": time.perf_counter() - start,
    }
    if method is not None:
        result["stats"] = stats
    return result


def main(argv: list[str] | None = None) -> None:
    import torch

    from leanvlm.real_model import load_real_model
    from leanvlm.real_model.data import easyvqa, scenes

    ap = argparse.ArgumentParser(description="Evaluate the bundled real model (no token reduction).")
    ap.add_argument("--mode", choices=("end-to-end", "cached"), default="end-to-end",
                    help="end-to-end: evaluate() on images (one prompt per question). cached: the training's "
                         "prefix-shared forward on cached DINOv2 features (same computation up to the float16 "
                         "rounding of the cached features, ~5x cheaper; computes the feature cache if missing)")
    ap.add_argument("--easyvqa-images", type=int, default=0, help="questions of the first N test images (0 = all)")
    ap.add_argument("--scenes", type=int, default=200, help="number of test scenes (seed 0)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--feature-dir", default=os.path.join(os.getcwd(), ".cache", "features"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--weights-dir", default=None,
                    help="adapter directory to evaluate (adapter.safetensors + recipe.json; default: the shipped weights/)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, processor = load_real_model(weights_dir=args.weights_dir)
    test = easyvqa("test")
    if args.easyvqa_images:
        keep = list(dict.fromkeys(it.image_key for it in test))[: args.easyvqa_images]
        test = [it for it in test if it.image_key in set(keep)]
    scene_items = scenes("test", args.scenes, 0)
    if args.mode == "end-to-end":
        results = {"easyvqa_test": evaluate(model, processor, test, args.batch_size),
                   "scenes_test": evaluate(model, processor, scene_items, args.batch_size)}
    else:
        from leanvlm.real_model.adapter import WEIGHTS_DIR, load_recipe
        from leanvlm.real_model.features import cache_features
        from leanvlm.real_model.train import PackedData, Packer, cached_rows, quick_eval

        packer = Packer(processor)
        rows = cached_rows(load_recipe(args.weights_dir or WEIGHTS_DIR)["vision_feature_layer"])
        results = {}
        sets = (("easyvqa_test", f"easyvqa-test-img{args.easyvqa_images or 'all'}", test),
                ("scenes_test", f"scenes-test-0-n{args.scenes}", scene_items))
        for key, name, items in sets:
            cache_features(model.model.vision_tower, items, args.feature_dir, name)  # no-op when cached
            data = PackedData({name: lambda items=items: items}, args.feature_dir, rows)
            start = time.perf_counter()
            results[key] = {**quick_eval(model, packer, data), "seconds": time.perf_counter() - start}
    results.update(mode=args.mode, easyvqa_images=args.easyvqa_images or "all", scenes=args.scenes)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()

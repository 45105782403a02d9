"""Where AIM's counting loss on the bundled image model comes from: does the merge lose objects, and which
counts does the model confuse with and without it?

Data: held-out scenes (`scenes("heldout", N, seed)`, 2-4 shapes of distinct colours on a pale background).
1. Objects through the merge (`AIM()`'s own pre-LLM stage on the projector output): per object, the
   output tokens whose merge group is at least half the object's patches (an object's patches: the
   16 x 16 grid cells whose centre lies within 10 px of its centre, radius >= 11 px),
   objects left with none of their own, and groups that mix two objects.
2. The count question ("how many shapes are there?") of every scene, closed-set: confusion (answer ->
   prediction) of the plain model, `AIM()` and `AIM(prune=False)`.

    python benchmarks/aim_count_analysis.py --scenes 200 --seed 2 --out runs/aim-count.json
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np
import torch

import leanvlm
from leanvlm.real_model import load_real_model, prepare_inputs
from leanvlm.real_model.data import scene_objects, scenes
from leanvlm.real_model.evaluate import predict
from leanvlm.runtime.visual import VisualItem

IMAGE_SIZE = 128  # scenes are drawn at 128 x 128 px
INNER_RADIUS = 10.0  # px: inside every shape (radii 11-18 px)
COUNT_QUESTION = "how many shapes are there?"


def objects_through_merge(model, processor, count: int, seed: int, method: leanvlm.AIM) -> dict:
    """Part 1 over the first `count` held-out scenes of `seed` (the same images `scenes()` draws), through
    the pre-LLM stage of `method`."""
    (merge,), _ = method.stages()
    own_tokens, lost, mixed = [], 0, 0
    for image, objects in scene_objects("heldout", count, seed):
        inputs = prepare_inputs(processor, [image], [COUNT_QUESTION])
        with torch.no_grad():
            features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        features = features[0]  # [T, C] (a list of [T, C] or a [1, T, C] tensor)
        side = round(features.shape[0] ** 0.5)
        merged = merge.reduce(VisualItem.from_frames(features[None], (side, side), 0))
        assignment = merged.groups[0].numpy()  # [T]: the output token each patch ended in
        rows, cols = np.mgrid[0:side, 0:side]
        cell = IMAGE_SIZE / side
        owner = np.full(side * side, -1)
        for i, (_, _, x, y) in enumerate(objects):
            inside = ((cols + 0.5) * cell - x) ** 2 + ((rows + 0.5) * cell - y) ** 2 < INNER_RADIUS ** 2
            owner[inside.reshape(-1)] = i
        for i in range(len(objects)):
            groups = set(assignment[owner == i].tolist())
            own = [g for g in groups if (owner[assignment == g] == i).mean() >= 0.5]
            own_tokens.append(len(own))
            lost += not own
        mixed += sum(len(set(owner[assignment == g].tolist()) - {-1}) > 1 for g in set(assignment.tolist()))
    return {"objects": len(own_tokens), "objects_without_own_token": lost,
            "own_tokens_per_object_mean": float(np.mean(own_tokens)), "own_tokens_per_object_min": int(min(own_tokens)),
            "groups_mixing_two_objects": int(mixed)}


def count_confusion(model, processor, count: int, seed: int, batch_size: int) -> dict:
    """Part 2: accuracy and answer -> prediction counts on the count questions, per configuration."""
    items = [item for item in scenes("heldout", count, seed) if item.qtype == "count"]
    results = {}
    # "AIM()" is the SPEC settings AIM() had on images when this was measured (merge to 25%, layers 15-23)
    spec = dict(merge_keep=0.25, l1=15, l2=24)
    for name, method in (("plain", None), ("AIM()", leanvlm.AIM(**spec)), ("AIM(prune=False)", leanvlm.AIM(**spec, prune=False))):
        predictions, _ = predict(model, processor, items, batch_size, method, progress=False)
        pairs = collections.Counter(f"{i.answer}->{p}" for i, p in zip(items, predictions))
        accuracy = sum(i.answer == p for i, p in zip(items, predictions)) / len(items)
        results[name] = {"accuracy": accuracy, "n": len(items), "confusion": dict(sorted(pairs.items()))}
        print(f"{name:18s} count accuracy {accuracy:.3f}  {dict(sorted(pairs.items()))}", flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("runs/aim-count.json"))
    args = parser.parse_args(argv)
    model, processor = load_real_model()
    merge = objects_through_merge(model, processor, args.scenes, args.seed, leanvlm.AIM(merge_keep=0.25))
    print("objects through the merge:", merge, flush=True)
    result = {"scenes": args.scenes, "seed": args.seed, "objects_through_merge": merge,
              "count_questions": count_confusion(model, processor, args.scenes, args.seed, args.batch_size)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

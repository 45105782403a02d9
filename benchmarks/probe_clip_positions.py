"""Is a token's place in the frame in the video model's vision features? A linear probe.

The video model fails "does the circle move left or right?" (docs/video_model.md). This checks the first
link of that chain: from the DINOv2 hidden states the projector reads (layers 4 and 12, and each alone; layer
0 = patch + position embeddings, for reference), pooled 16x16 -> 8x8 as OneVision pools a frame, a ridge
regression predicts each pooled token's column and row (0-7). Fit on the first two thirds of the frames of
the first `--clips` training clips, scored on the rest (R^2, and the share rounded to the right index).

    python benchmarks/probe_clip_positions.py --clips 30 --json benchmarks/results/clips/position-probe.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from leanvlm.real_model.assemble import make_image_processor
from leanvlm.real_model.clips import clips
from leanvlm.real_model.video_model import load_video_base

LAYER_SETS = {"4+12 (the model's)": (4, 12), "4": (4,), "12": (12,), "0 (embeddings)": (0,)}


def ridge_probe(features: torch.Tensor, target: torch.Tensor, train: int, penalty: float = 1.0) -> dict[str, float]:
    """features [N, 64, C], target [64] (per pooled token) -> R^2 and exact-index share on frames train:."""
    x = features.double()
    y = target.double().expand(x.shape[0], -1)
    x_fit, y_fit = x[:train].flatten(0, 1), y[:train].flatten()
    x_test, y_test = x[train:].flatten(0, 1), y[train:].flatten()
    mean, offset = x_fit.mean(0), y_fit.mean()
    x_fit, x_test = x_fit - mean, x_test - mean
    eye = torch.eye(x_fit.shape[1], dtype=torch.double)
    weights = torch.linalg.solve(x_fit.T @ x_fit + penalty * eye, x_fit.T @ (y_fit - offset))
    predicted = x_test @ weights + offset
    r2 = 1 - ((predicted - y_test) ** 2).mean() / ((y_test - y_test.mean()) ** 2).mean()
    exact = (predicted.round().clamp(0, 7) == y_test).double().mean()
    return {"r2": round(float(r2), 4), "exact": round(float(exact), 4)}


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=30, help="training clips (8 frames each)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    model, _ = load_video_base()
    frames = {item.clip_key: item.frames for item in clips("train", args.clips, 0)}
    images = [frame for clip in frames.values() for frame in clip]
    processor, tower = make_image_processor(), model.model.vision_tower
    layers = sorted({layer for chosen in LAYER_SETS.values() for layer in chosen})
    pooled = {layer: [] for layer in layers}
    for start in range(0, len(images), 16):
        pixels = processor(images[start:start + 16], return_tensors="pt").pixel_values
        hidden = tower(pixels, output_hidden_states=True).hidden_states
        for layer in layers:
            grid = hidden[layer][:, 1:].unflatten(1, (16, 16)).permute(0, 3, 1, 2)  # [n, C, 16, 16], CLS dropped
            pooled[layer].append(F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2))  # [n, 64, C]
    pooled = {layer: torch.cat(chunks) for layer, chunks in pooled.items()}
    train = len(images) * 2 // 3
    column = torch.arange(8).repeat(8)  # raster order: token i sits at row i // 8, column i % 8
    row = torch.arange(8).repeat_interleave(8)
    results = {"frames": len(images), "fit_frames": train, "probes": {}}
    for name, chosen in LAYER_SETS.items():
        features = torch.cat([pooled[layer] for layer in chosen], dim=-1)
        results["probes"][name] = {"column": ridge_probe(features, column, train), "row": ridge_probe(features, row, train)}
        print(f"{name:18s} column {results['probes'][name]['column']}  row {results['probes'][name]['row']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()

"""Visual tokens HoliTom and FastVID send to the LLM on synthetic clips, measured on a random-weight
LLaVA-OneVision-shaped model (no download), next to the analytic plan `leanvlm flops` uses.

    PYTHONPATH=src python benchmarks/video_peers_tokens.py --out benchmarks/results

Clips (16 frames of 96 x 96 px -> 12 x 12 SigLIP patches -> 6 x 6 = 36 tokens a frame after the model's
2 x 2 pooling, 576 visual tokens): "static" (one frame repeated, 1% pixel noise), "two scenes" (frames
0-7 and 8-15 from two different frames, 1% noise), "random" (independent frames). The weights are
random, so this measures the mechanics (what the temporal steps find and remove), not accuracy.
Writes video-peers-tokens.{md,json}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config,
                          SiglipVisionConfig)

import leanvlm
from leanvlm.methods.registry import visual_budget

FRAMES, SIDE, VIDEO_TOKEN = 16, 96, 121


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    vision = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                image_size=SIDE, patch_size=8, vision_use_head=False)
    text = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, pad_token_id=0)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=120,
                                  video_token_index=VIDEO_TOKEN, vision_feature_layer=-1,
                                  vision_feature_select_strategy="full")
    return LlavaOnevisionForConditionalGeneration(config).eval()


def clip(kind: str) -> torch.Tensor:
    """[1, F, 3, H, W] pixels."""
    g = torch.Generator().manual_seed(1)
    shots = torch.randn(FRAMES if kind == "random" else 2, 3, SIDE, SIDE, generator=g)
    if kind == "random":
        frames = shots
    else:
        frames = torch.stack([shots[0 if kind == "static" or f < FRAMES // 2 else 1] for f in range(FRAMES)])
        frames = frames + 0.01 * torch.randn(frames.shape, generator=g)
    return frames[None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs"))
    args = parser.parse_args()
    model = build_model()
    tokens_per_frame = (SIDE // 8 // 2) ** 2
    ids = torch.tensor([[5] * 4 + [VIDEO_TOKEN] * (FRAMES * tokens_per_frame + 1) + [6] * 8])
    methods = {"HoliTom(keep=0.1)": leanvlm.HoliTom(keep=0.1), "HoliTom(keep=0.25)": leanvlm.HoliTom(keep=0.25),
               "FastVID(keep=0.1)": leanvlm.FastVID(keep=0.1), "FastVID(keep=0.25)": leanvlm.FastVID(keep=0.25),
               "VisionZip(keep=0.1)": leanvlm.VisionZip(keep=0.1)}
    rows = []
    for kind in ("static", "two scenes", "random"):
        pixels = clip(kind)
        for name, method in methods.items():
            with method.apply(model), torch.no_grad():
                model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=pixels)
            sample = method.stats.samples[0]
            planned = method.stages()[0][0].planned_tokens(tokens_per_frame) * FRAMES
            rows.append({"clip": kind, "method": name, "visual_in": sample.visual_in,
                         "visual_into_llm": sample.visual_into_llm, "planned": planned,
                         "budget": round(visual_budget(sample), 4), "flops_ratio": round(method.stats.flops_ratio, 2)})
    lines = ["| clip | method | visual tokens in | into the LLM | analytic plan | FLOPs ratio (measured) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['clip']} | {r['method']} | {r['visual_in']} | {r['visual_into_llm']} | {r['planned']} | "
              f"{r['flops_ratio']}x |" for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "video-peers-tokens.md").write_text("\n".join(lines) + "\n")
    (args.out / "video-peers-tokens.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

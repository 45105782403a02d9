"""Experiment: does ToMe's proportional attention recover what AIM's merge loses on the bundled model?

After AIM's pre-LLM merge one token stands for up to ~16 patches, but the LLM attends to it as to one.
Proportional attention (Bolya et al., ToMe, ICLR 2023) adds log(size) to every attention logit of a merged
key, so a token that stands for s patches gets the attention s identical copies would get. This script
measures it outside the runtime (it is not a leanvlm option yet): AIM's own merge (`ops.merge.merge_tokens`,
its default quarter-per-pass schedule, to --keep), the merged tokens spliced into the prompt in raster order
with contiguous positions (as the runtime does), and the language model run on inputs_embeds with a 4-D
additive mask: causal, plus log(size) on the merged keys (zero bias = `AIM(prune=False)`'s computation).
Closed-set scoring as `real_model.score_answers`, on held-out scenes and fresh easy-VQA-style images.

    python benchmarks/proportional_attention.py --scenes 200 --images 60 --seed 1 --out runs/propattn.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from leanvlm.methods.aim import PASS_FRACTION
from leanvlm.ops.merge import merge_tokens
from leanvlm.real_model import ANSWERS, answer_token_ids, load_real_model, prepare_inputs
from leanvlm.real_model.data import fresh_easyvqa, scenes


@torch.no_grad()
def answers_for_image(model, processor, image, questions: list[str], keep: float, proportional: bool) -> list[str]:
    """Closed-set answers to every question about one image, the image merged once to `keep`."""
    config = model.config
    # every question's prompt in one call: the image goes through the image processor once
    inputs = prepare_inputs(processor, [image] * len(questions), questions)
    pixels = inputs["pixel_values"][:1].to(model.dtype)
    encoded = model.model.get_image_features(pixel_values=pixels, vision_feature_layer=config.vision_feature_layer,
                                             vision_feature_select_strategy=config.vision_feature_select_strategy,
                                             return_dict=True)
    features = encoded.pooler_output[0][None]  # [1, T, C] (a list of [T, C] or a [1, T, C] tensor)
    merged = merge_tokens(features, None, keep, pass_fraction=PASS_FRACTION)  # tokens [1, T', C], sizes [1, T']
    bias = merged.sizes[0].float().log() if proportional else torch.zeros(merged.sizes.shape[1])
    embed = model.get_input_embeddings()
    candidates = answer_token_ids(processor)
    out = []
    for row in range(len(questions)):
        ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()]  # [L] unpadded, 256 image placeholders
        visual = (ids == config.image_token_id).nonzero().squeeze(1)
        start, end = int(visual[0]), int(visual[-1]) + 1
        embeds = torch.cat([embed(ids[:start]), merged.tokens[0].to(embed.weight.dtype), embed(ids[end:])])[None]
        length = embeds.shape[1]
        key_bias = torch.zeros(length)
        key_bias[start:start + merged.tokens.shape[1]] = bias
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        mask = torch.where(causal, key_bias[None, :], torch.finfo(torch.float32).min)[None, None]  # [1, 1, L', L']
        hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask,
                                            position_ids=torch.arange(length)[None]).last_hidden_state
        logits = model.lm_head(hidden[:, -1])[0]
        out.append(ANSWERS[int(logits[candidates].argmax())])
    return out


def evaluate(model, processor, items, keep: float, proportional: bool) -> dict:
    by_image: dict[str, list] = {}
    for item in items:
        by_image.setdefault(item.image_key, []).append(item)
    right, count = {}, {}
    for group in by_image.values():
        predictions = answers_for_image(model, processor, group[0].image, [i.question for i in group], keep, proportional)
        for item, prediction in zip(group, predictions):
            count[item.qtype] = count.get(item.qtype, 0) + 1
            right[item.qtype] = right.get(item.qtype, 0) + int(prediction == item.answer)
    return {"accuracy": sum(right.values()) / sum(count.values()), "n": sum(count.values()),
            "per_type": {k: right[k] / count[k] for k in sorted(count)}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=200, help="held-out scenes")
    parser.add_argument("--images", type=int, default=60, help="fresh easy-VQA-style images")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", type=float, default=0.25, help="merge to this fraction (AIM's merge_keep)")
    parser.add_argument("--out", type=Path, default=Path("runs/propattn.json"))
    args = parser.parse_args(argv)
    model, processor = load_real_model(progress=False)
    data = {"scenes": scenes("heldout", args.scenes, args.seed), "easyvqa": fresh_easyvqa(args.images, args.seed)}
    results = {"command": "python benchmarks/proportional_attention.py " + " ".join(argv or sys.argv[1:]),
               "keep": args.keep, "rows": {}}
    for proportional in (False, True):  # plain merge first: it must equal AIM(prune=False)
        name = "merge + proportional attention" if proportional else "merge only (= AIM(prune=False))"
        row = {}
        for dataset, items in data.items():
            start = time.perf_counter()
            row[dataset] = {**evaluate(model, processor, items, args.keep, proportional),
                            "seconds": time.perf_counter() - start}
            print(f"{name}: {dataset} {row[dataset]['accuracy']:.3f} {row[dataset]['per_type']}", flush=True)
        results["rows"][name] = row
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Train the video model's projector + newline + LoRA on the generated clips (CPU).

    python -m leanvlm.real_model.train_video --out runs/video --steps 300 --bf16

Starts from the image model (video_model.load_video_base: its LoRA merged, its projector copied), so
only what video adds is learnt: time (order, counting frames, colour at the start / end, direction) and
OneVision's pooled 8x8-per-frame layout. Same recipe as train.py: DINOv2 features cached on disk
(features.cache_clip_features; the tower is frozen, so the cache is exact), prefix-shared sequences
(all questions about one clip share one forward of the clip's 513 visual tokens, train.Packer), loss on
the answer tokens, checkpoint every --ckpt-every steps (rerun the same command to resume), final weights
to <out>/adapter.safetensors + recipe.json (copy them to weights_video/).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from leanvlm.real_model.adapter import LORA_TARGETS, add_lora, adapter_state, save_adapter
from leanvlm.real_model.clips import CLIP_ANSWERS, FRAMES, ClipItem, clips, played_backwards
from leanvlm.real_model.features import cache_clip_features, load_features
from leanvlm.real_model import train
from leanvlm.real_model.train import Packer
from leanvlm.real_model.video_model import (
    VIDEO_TOKEN,
    build_video_prompt,
    clip_answer_token_ids,
    load_video_base,
    num_video_tokens,
)

TRAIN_SETS = {"clips-train-0-n300": lambda: clips("train", 300, 0, every_question=True)}
EVAL_SETS = {"clips-test-0-n40": lambda: clips("test", 40, 0)}


class ClipData:
    """Questions grouped by clip, with each clip's cached features [F, 256, 768] (float16 memmap)."""

    def __init__(self, sets: dict, feature_dir: str):
        self.groups: list[tuple[np.ndarray, int, list[ClipItem]]] = []
        for name, loader in sets.items():
            feats, index = load_features(feature_dir, name)
            by_clip: dict[str, list[ClipItem]] = {}
            for item in loader():
                by_clip.setdefault(item.clip_key, []).append(item)
            self.groups += [(feats, index[key], items) for key, items in by_clip.items()]

    def features(self, group: int) -> torch.Tensor:
        feats, row, _ = self.groups[group]
        return torch.from_numpy(feats[row].astype(np.float32))


def video_hidden(model, packer: Packer, features: torch.Tensor, input_ids, position_ids, mask) -> torch.Tensor:
    """Language-model hidden states [B, T, 576] with OneVision's video features at the video tokens:
    features [B, F, 256, 768] -> projector -> 8x8 bilinear pooling per frame -> [B, F * 64, 576] + newline."""
    b, frames = features.shape[:2]
    projected = model.model.multi_modal_projector(features.flatten(0, 1))  # [B * F, 256, 576]
    pooled = model.model.apply_pooling(projected).reshape(b, -1, projected.shape[-1])  # [B, F * 64, 576]
    video = torch.cat([pooled, model.model.image_newline.expand(b, 1, -1).to(pooled.dtype)], 1)
    embeds = model.model.language_model.embed_tokens(input_ids)
    where = (input_ids == packer.image_id).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(where, video.to(embeds.dtype))
    out = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state


def quick_eval(model, packer: Packer, data: ClipData, batch_clips: int = 4) -> dict:
    """Closed-set (CLIP_ANSWERS) first-token accuracy on cached eval clips, by question type (train.quick_eval
    with the video forward)."""
    return train.quick_eval(model, packer, data, batch_clips, video_hidden, CLIP_ANSWERS,
                            clip_answer_token_ids(packer.processor))


def _initial_params(source: str) -> dict[str, torch.Tensor]:
    """Trainable tensors to start from: a run's ckpt.pt, or a weights directory (its adapter.safetensors uses
    the same names: projector.*, lora.<path>.A/B, image_newline)."""
    if os.path.isdir(source):
        return load_file(os.path.join(source, "adapter.safetensors"))
    return torch.load(source, weights_only=False)["params"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-clips", type=int, default=2)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument("--lr-projector", type=float, default=5e-4)
    ap.add_argument("--lr-lora", type=float, default=1e-3)
    ap.add_argument("--lr-newline", type=float, default=1e-2)
    ap.add_argument("--count-weight", type=float, default=2.0, help="loss weight of frame-counting questions")
    ap.add_argument("--direction-weight", type=float, default=1.0, help="loss weight of direction questions")
    ap.add_argument("--reverse", action="store_true",
                    help="also train on each batch's clips played backwards (clips.played_backwards: direction "
                         "flips, start/end colours swap), so the two orders differ only in time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt-every", type=int, default=5)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--feature-dir", default=os.path.join(os.getcwd(), ".cache", "features"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--init-from", default=None, help="start from a run's ckpt.pt or a weights directory's "
                    "adapter.safetensors (same --lora-r; fresh optimiser)")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the feature cache and training (fp32 master weights)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed), random.seed(args.seed), np.random.seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "train_log.txt")

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with open(log_path, "a") as f:
            f.write(line + "\n")

    model, processor = load_video_base()
    for p in model.parameters():
        p.requires_grad_(False)
    packer = Packer(processor, build_video_prompt, VIDEO_TOKEN, num_video_tokens(FRAMES))
    for name, loader in {**TRAIN_SETS, **EVAL_SETS}.items():
        cache_clip_features(model.model.vision_tower, loader(), args.feature_dir, name, bf16=args.bf16)
    train, evals = ClipData(TRAIN_SETS, args.feature_dir), ClipData(EVAL_SETS, args.feature_dir)

    if args.bf16:
        model.model.language_model.to(torch.bfloat16)
    loras = add_lora(model, args.lora_r, args.lora_alpha)
    proj_params = list(model.model.multi_modal_projector.parameters())
    lora_params = [p for l in loras.values() for p in (l.A, l.B)]
    newline = model.model.image_newline
    for p in proj_params + lora_params + [newline]:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": proj_params, "lr": args.lr_projector},
                             {"params": lora_params, "lr": args.lr_lora},
                             {"params": [newline], "lr": args.lr_newline}], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[args.lr_projector, args.lr_lora, args.lr_newline],
                                                total_steps=args.steps, pct_start=0.1, anneal_strategy="cos")
    trainable = {**{f"projector.{k}": v for k, v in model.model.multi_modal_projector.named_parameters()},
                 **{f"lora.{k}.{n}": getattr(l, n) for k, l in loras.items() for n in ("A", "B")},
                 "image_newline": newline}
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    step = 0
    if args.init_from and not os.path.exists(ckpt_path):
        with torch.no_grad():
            for k, v in _initial_params(args.init_from).items():
                trainable[k].copy_(v)
    if os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, weights_only=False)
        with torch.no_grad():
            for k, v in ck["params"].items():
                trainable[k].copy_(v)
        opt.load_state_dict(ck["opt"])
        step = ck["step"]
        if ck["sched"]["total_steps"] == args.steps:
            sched.load_state_dict(ck["sched"])
        else:  # --steps changed (e.g. to fit a deadline): same schedule shape over the new length
            for _ in range(step):
                sched.step()
        log(f"resumed from step {step} (total steps {args.steps})")
    else:
        log(f"args {json.dumps(vars(args))}")
        log(f"train clips {len(train.groups)}, questions {sum(len(g[2]) for g in train.groups)}; eval questions "
            f"{sum(len(g[2]) for g in evals.groups)}")

    per_epoch = len(train.groups) // args.batch_clips
    qtype_weight = {"count": args.count_weight, "direction": args.direction_weight}
    model.train()
    t0, losses = time.time(), []
    while step < args.steps:
        epoch, k = divmod(step, per_epoch)
        perm = np.random.default_rng([args.seed, epoch]).permutation(len(train.groups))
        idx = perm[k * args.batch_clips:(k + 1) * args.batch_clips].tolist()
        rows = [[(it.question, it.answer, it.qtype) for it in train.groups[g][2]] for g in idx]
        feats = [train.features(g) for g in idx]  # each [F, 256, 768]
        if args.reverse:
            rows += [played_backwards(r) for r in rows]
            feats += [f.flip(0) for f in feats]
        groups = [[(q, a, qtype_weight.get(t, 1.0)) for q, a, t in r] for r in rows]
        input_ids, pos, mask, targets, weights = packer.pack(groups)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            hidden = video_hidden(model, packer, torch.stack(feats), input_ids, pos, mask)
            sel = targets != -100
            logits = model.lm_head(hidden[sel])
        loss = (F.cross_entropy(logits.float(), targets[sel], reduction="none") * weights[sel]).sum() / weights[sel].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(proj_params + lora_params + [newline], 1.0)
        opt.step(), sched.step()
        step += 1
        losses.append(loss.item())
        if step % 5 == 0:
            log(f"step {step}/{args.steps} loss {np.mean(losses[-5:]):.4f} {(time.time() - t0) / len(losses):.2f} s/step "
                f"tokens/seq {input_ids.shape[1]}")
        if step % args.ckpt_every == 0 or step == args.steps:
            torch.save({"params": {k: v.detach().clone() for k, v in trainable.items()}, "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "step": step}, ckpt_path + ".tmp")
            os.replace(ckpt_path + ".tmp", ckpt_path)
        if step % args.eval_every == 0 or step == args.steps:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                log(f"eval step {step}: {json.dumps(quick_eval(model, packer, evals))}")

    recipe = {"base": "video_model.load_video_base (the image model of video_model.IMAGE_WEIGHTS_OF_VIDEO merged)",
              "lora_r": args.lora_r, "lora_alpha": args.lora_alpha, "lora_targets": list(LORA_TARGETS),
              "frames": FRAMES, "steps": args.steps, "seed": args.seed, "train_args": vars(args)}
    save_adapter(adapter_state(model, loras), recipe, args.out)
    log(f"wrote {args.out}/adapter.safetensors, total {(time.time() - t0) / 60:.1f} min this session")


if __name__ == "__main__":
    main()

"""Train the real model's projector + LoRA (q, k, v, o, gate, up, down of every SmolLM2 layer) on CPU.

    python -m leanvlm.real_model.train --out runs/main --steps 400

Data: easy-VQA train + generated scenes (data.py), with DINOv2 patch features precomputed once
(features.py; the vision tower is frozen, so the cache is exact). Loss: cross-entropy on the answer
text (answer tokens + <|im_end|>) given the single-turn chat prompt, i.e. exactly what inference sees.

Efficiency trick (same gradients as separate single-question sequences): all questions about one image
share one forward of the image prefix. A sequence is
    [system + "<|im_start|>user\\n" + 256 image tokens] [q1 + answer1] [q2 + answer2] ...
with a block attention mask (each question block sees the prefix and itself, causally) and position ids
that restart after the prefix for every block, so every block is computed exactly as the stand-alone
prompt "prefix + block" would be. This cuts the tokens per supervised answer ~5x.

The shipped weights come from four runs (weights/recipe.json "stages", weights/train_log.txt): 400 steps
from scratch in float32, then `--init-from` those weights, 900 steps with `--bf16` (bfloat16 autocast,
float32 master weights: ~1.7x faster on CPUs with AMX), 4 images a step and twice the easy-VQA images;
then 165 + 220 steps on scenes with every question each answers (`scenes-every-*`, count and colour
questions weighted 3), each run continuing the previous one.

Resumable: a checkpoint (trainable params, optimiser, scheduler, step) is written every --ckpt-every
steps to <out>/ckpt.pt; rerunning the same command continues from it. The data order is a function
of (seed, step). Final weights go to <out>/adapter.safetensors + recipe.json (copy them to weights/).
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

from leanvlm.real_model import ANSWERS, answer_token_ids, build_prompt
from leanvlm.real_model.adapter import LORA_TARGETS, add_lora, adapter_state, read_adapter, save_adapter
from leanvlm.real_model.assemble import NUM_IMAGE_TOKENS, load_base
from leanvlm.real_model.data import VQAItem, easyvqa, scenes
from leanvlm.real_model.features import CACHED_LAYERS, cache_features, load_features

# (feature-cache name, item loader) for training and for the quick in-training evaluation.
TRAIN_SETS = {
    "easyvqa-train-img2000": lambda: [i for i in easyvqa("train") if _image_id(i) < 2000],
    "easyvqa-train-img2000-4000": lambda: [i for i in easyvqa("train") if _image_id(i) >= 2000],
    "scenes-train-0-n800": lambda: scenes("train", 800, 0),
    "scenes-train-1-n800": lambda: scenes("train", 800, 1),
    # the same kind of scenes with every question each one answers (~17 a scene instead of ~4.5)
    "scenes-every-train-0-n800": lambda: scenes("train", 800, 0, every_question=True),
    "scenes-every-train-1-n3000": lambda: scenes("train", 3000, 1, every_question=True),
}
EVAL_SETS = {
    "easyvqa-test-q1500": lambda: easyvqa("test")[:1500],
    "scenes-test-0-n100": lambda: scenes("test", 100, 0),
}


def _image_id(item: VQAItem) -> int:
    return int(item.image_key.rsplit("-", 1)[1])


class PackedData:
    """Questions grouped by image, with each image's cached features ([L, 256, 384] per cached layer)."""

    def __init__(self, sets: dict, feature_dir: str, layer_rows: list[int]):
        self.groups: list[tuple[np.ndarray, int, list[VQAItem]]] = []
        for name, loader in sets.items():
            feats, index = load_features(feature_dir, name)
            by_image: dict[str, list[VQAItem]] = {}
            for item in loader():
                by_image.setdefault(item.image_key, []).append(item)
            for key, items in by_image.items():
                self.groups.append((feats, index[key], items))
        self.layer_rows = layer_rows

    def features(self, group: int) -> torch.Tensor:
        """[256, 384 * len(layers)] float32: the selected layers concatenated along channels (as Llava does)."""
        feats, row, _ = self.groups[group]
        return torch.from_numpy(np.concatenate([feats[row, r] for r in self.layer_rows], -1).astype(np.float32))


class Packer:
    """Builds prefix-shared training sequences (see the module docstring) from the chat template."""

    def __init__(self, processor, prompt=build_prompt, placeholder: str | None = None, placeholders: int = NUM_IMAGE_TOKENS):
        """`prompt(processor, question)`: the chat prompt; its one `placeholder` token (default: the
        processor's image token) stands for `placeholders` visual tokens in the sequences."""
        self.tokenizer = processor.tokenizer
        self.image_id = self.tokenizer.convert_tokens_to_ids(placeholder or processor.image_token)
        self.processor = processor
        self.prompt = prompt
        probe = self._ids(prompt(processor, "?"))
        cut = probe.index(self.image_id) + 1
        self.prefix = probe[: cut - 1] + [self.image_id] * placeholders
        self._prefix_text_ids = probe[:cut]
        self.end_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self._cache: dict[tuple[str, str], tuple[list[int], int]] = {}

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def block(self, question: str, answer: str) -> tuple[list[int], int]:
        """(token ids after the prefix for "question -> answer<|im_end|>", number of answer tokens incl. end)."""
        key = (question, answer)
        if key not in self._cache:
            prompt = self._ids(self.prompt(self.processor, question))
            full = self._ids(self.prompt(self.processor, question) + answer) + [self.end_id]
            if full[: len(self._prefix_text_ids)] != self._prefix_text_ids or full[: len(prompt)] != prompt:
                raise ValueError(f"prefix tokenisation differs for {question!r}")
            self._cache[key] = (full[len(self._prefix_text_ids):], len(full) - len(prompt))
        return self._cache[key]

    def pack(self, groups: list[list[tuple[str, str, float]]]):
        """Batch of images, each with [(question, answer, loss weight)].

        Returns input_ids [B, T] (image positions hold the image token), position_ids [B, T],
        mask [B, 1, T, T] bool (True = may attend), targets [B, T] (-100 = no loss; at position t the
        target is the token at t + 1), weights [B, T] float.
        """
        seqs, poss, segs, tgts, wts = [], [], [], [], []
        p = len(self.prefix)
        for qas in groups:
            ids, pos, seg, tgt, wt = list(self.prefix), list(range(p)), [0] * p, [-100] * p, [0.0] * p
            for b, (question, answer, weight) in enumerate(qas, start=1):
                block, n_answer = self.block(question, answer)
                start = len(ids)
                ids += block
                pos += range(p, p + len(block))
                seg += [b] * len(block)
                block_tgt = [-100] * len(block)
                for j in range(len(block) - n_answer, len(block)):
                    block_tgt[j - 1] = block[j]  # predict answer token j from position j - 1
                tgt += block_tgt
                wt += [weight if t != -100 else 0.0 for t in block_tgt]
                assert len(ids) == start + len(block)
            seqs.append(ids), poss.append(pos), segs.append(seg), tgts.append(tgt), wts.append(wt)
        t = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([s + [pad] * (t - len(s)) for s in seqs])
        position_ids = torch.tensor([s + [0] * (t - len(s)) for s in poss])
        seg = torch.tensor([s + [-1] * (t - len(s)) for s in segs])
        targets = torch.tensor([s + [-100] * (t - len(s)) for s in tgts])
        weights = torch.tensor([s + [0.0] * (t - len(s)) for s in wts])
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        same = seg[:, :, None] == seg[:, None, :]
        to_prefix = (seg[:, None, :] == 0) & (seg[:, :, None] >= 0)
        mask = causal & (same | to_prefix) & (seg[:, None, :] >= 0)
        mask |= torch.eye(t, dtype=torch.bool)  # padded rows attend to themselves (avoids all-masked rows)
        return input_ids, position_ids, mask[:, None], targets, weights


def forward_hidden(model, packer: Packer, features: torch.Tensor, input_ids, position_ids, mask) -> torch.Tensor:
    """Language-model hidden states [B, T, 576] with the projected image features [B, 256, 384k] placed
    at the image-token positions (what LlavaModel.forward does, minus the vision tower)."""
    embeds = model.model.language_model.embed_tokens(input_ids)
    image = model.model.multi_modal_projector(features)
    where = (input_ids == packer.image_id).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(where, image.to(embeds.dtype))
    out = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state


def cached_rows(vision_feature_layer: int | list[int]) -> list[int]:
    """Rows of the feature cache (CACHED_LAYERS) for Llava's vision_feature_layer (indices into 13 hidden states)."""
    layers = [vision_feature_layer] if isinstance(vision_feature_layer, int) else vision_feature_layer
    return [CACHED_LAYERS.index(l % 13) for l in layers]


@torch.no_grad()
def quick_eval(model, packer: Packer, data: PackedData, batch_images: int = 8, hidden_fn=None,
               answers: tuple[str, ...] = ANSWERS, candidate_ids: list[int] | None = None) -> dict:
    """Closed-set first-token accuracy on cached eval features, by question type. hidden_fn (default
    `forward_hidden`), `answers` and their first-token `candidate_ids` (default: the image model's) let
    the video model's training (train_video.py) use the same loop."""
    was_training = model.training
    model.eval()
    hidden_fn = hidden_fn or forward_hidden
    cand = torch.tensor(candidate_ids if candidate_ids is not None else answer_token_ids(packer.processor))
    right: dict[str, list[int]] = {}
    for start in range(0, len(data.groups), batch_images):
        idx = list(range(start, min(start + batch_images, len(data.groups))))
        groups = [[(it.question, it.answer, 1.0) for it in data.groups[g][2]] for g in idx]
        input_ids, pos, mask, targets, _ = packer.pack(groups)
        hidden = hidden_fn(model, packer, torch.stack([data.features(g) for g in idx]), input_ids, pos, mask)
        for b, g in enumerate(idx):
            # the first answer target of each block sits at the block's last prompt position
            rows = (targets[b] != -100).nonzero().flatten().tolist()
            firsts = [r for r in rows if r - 1 not in rows]
            for r, item in zip(firsts, data.groups[g][2]):
                pred = answers[int(model.lm_head(hidden[b, r])[cand].argmax())]
                right.setdefault(item.qtype, []).append(int(pred == item.answer))
    model.train(was_training)
    total = [x for v in right.values() for x in v]
    return {"accuracy": sum(total) / len(total), "n": len(total),
            "per_type": {k: round(sum(v) / len(v), 4) for k, v in sorted(right.items())}}


def init_projector(model, data: PackedData, seed: int) -> None:
    """Data-dependent init: standardise each input channel (the concatenated DINOv2 layers differ ~50x in
    scale) by folding 1/std into linear_1, and scale linear_2 so projected tokens start at the norm of
    SmolLM2's word embeddings."""
    g = torch.Generator().manual_seed(seed)
    sample = torch.stack([data.features(i) for i in torch.randperm(len(data.groups), generator=g)[:64].tolist()])
    sample = sample.flatten(0, 1)
    proj = model.model.multi_modal_projector
    with torch.no_grad():
        std = sample.std(0).clamp_min(1e-6)
        mean = sample.mean(0)
        proj.linear_1.weight /= std
        proj.linear_1.bias -= proj.linear_1.weight @ mean
        out = proj(sample[:2048])
        target = model.model.language_model.embed_tokens.weight.norm(dim=-1).mean()
        proj.linear_2.weight *= target / out.norm(dim=-1).mean()
        proj.linear_2.bias *= target / out.norm(dim=-1).mean()


@torch.no_grad()
def load_adapter_factors(model, loras: dict, directory: str) -> None:
    """Copy a saved adapter (adapter.read_adapter) into the projector and the training-time LoRA wrappers."""
    projector, factors = read_adapter(directory)
    model.model.multi_modal_projector.load_state_dict({k: v.float() for k, v in projector.items()})
    for path, lora in loras.items():
        a, b = factors[path]
        lora.A.copy_(a.float())
        lora.B.copy_(b.float())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-images", type=int, default=2)
    ap.add_argument("--max-questions", type=int, default=12, help="questions per image per step (all if fewer)")
    ap.add_argument("--layers", default="4,12", help="DINOv2 hidden_states indices for the projector")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument("--lr-projector", type=float, default=2e-3)
    ap.add_argument("--lr-lora", type=float, default=1e-3)
    ap.add_argument("--color-weight", type=float, default=2.0, help="loss weight of colour questions")
    ap.add_argument("--count-weight", type=float, default=1.0, help="loss weight of counting questions")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt-every", type=int, default=5)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-images", type=int, default=60, help="cached test images for the quick eval")
    ap.add_argument("--feature-dir", default=os.path.join(os.getcwd(), ".cache", "features"))
    ap.add_argument("--train-sets", default="easyvqa-train-img2000,scenes-train-0-n800",
                    help=f"comma-separated names from {list(TRAIN_SETS)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true",
                    help="bfloat16 autocast for forward/backward (fp32 master weights; ~2-3x faster on CPUs with AMX)")
    ap.add_argument("--init-from", default=None,
                    help="start from this weights directory's adapter (projector + LoRA) instead of a fresh init")
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

    layers = [int(x) for x in args.layers.split(",")]
    hf_layers = [l if l < 0 else l - 13 for l in layers]  # as negative indices into 13 hidden states
    vision_feature_layer = hf_layers if len(hf_layers) > 1 else hf_layers[0]
    rows = cached_rows(vision_feature_layer)
    model, processor = load_base(vision_feature_layer)
    for p in model.parameters():
        p.requires_grad_(False)
    packer = Packer(processor)
    train_sets = {k: TRAIN_SETS[k] for k in args.train_sets.split(",")}
    for name, loader in {**train_sets, **EVAL_SETS}.items():  # precompute once; no-op when cached
        cache_features(model.model.vision_tower, loader(), args.feature_dir, name)
    train = PackedData(train_sets, args.feature_dir, rows)
    evals = PackedData(EVAL_SETS, args.feature_dir, rows)
    ev_rng = random.Random(1234)
    evals.groups = [g for g in evals.groups if g[2][0].image_key.startswith("easyvqa")][: args.eval_images] + \
        [g for g in evals.groups if g[2][0].image_key.startswith("scenes")][: args.eval_images // 2]
    ev_rng.shuffle(evals.groups)

    if args.bf16:  # frozen weights stored in bf16 (no per-step cast); trainable ones stay float32 masters
        model.model.language_model.to(torch.bfloat16)
    loras = add_lora(model, args.lora_r, args.lora_alpha)
    if args.init_from:
        load_adapter_factors(model, loras, args.init_from)
    else:
        init_projector(model, train, args.seed)
    proj_params = list(model.model.multi_modal_projector.parameters())
    lora_params = [p for l in loras.values() for p in (l.A, l.B)]
    for p in proj_params + lora_params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": proj_params, "lr": args.lr_projector},
                             {"params": lora_params, "lr": args.lr_lora}], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[args.lr_projector, args.lr_lora],
                                                total_steps=args.steps, pct_start=0.1, anneal_strategy="cos")
    trainable = {**{f"projector.{k}": v for k, v in model.model.multi_modal_projector.named_parameters()},
                 **{f"lora.{k}.{n}": getattr(l, n) for k, l in loras.items() for n in ("A", "B")}}
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    step = 0
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
        log(f"train images {len(train.groups)}, questions {sum(len(g[2]) for g in train.groups)}; "
            f"eval questions {sum(len(g[2]) for g in evals.groups)}; trainable params "
            f"{sum(p.numel() for p in proj_params)} projector + {sum(p.numel() for p in lora_params)} LoRA")

    per_epoch = len(train.groups) // args.batch_images

    def batch_groups(s: int) -> list[int]:
        epoch, k = divmod(s, per_epoch)
        perm = np.random.default_rng([args.seed, epoch]).permutation(len(train.groups))
        return perm[k * args.batch_images:(k + 1) * args.batch_images].tolist()

    weight = {"color": args.color_weight, "count": args.count_weight}  # loss weight by question type
    model.train()
    t0, losses = time.time(), []
    while step < args.steps:
        idx = batch_groups(step)
        qrng = np.random.default_rng([args.seed, 10_000 + step])
        groups = []
        for g in idx:
            items = train.groups[g][2]
            chosen = qrng.permutation(len(items))[: args.max_questions]
            groups.append([(items[i].question, items[i].answer, weight.get(items[i].qtype, 1.0)) for i in chosen])
        input_ids, pos, mask, targets, weights = packer.pack(groups)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            hidden = forward_hidden(model, packer, torch.stack([train.features(g) for g in idx]), input_ids, pos, mask)
            sel = targets != -100
            logits = model.lm_head(hidden[sel])  # only the answer positions: the 49k-way head is costly
        loss = (F.cross_entropy(logits.float(), targets[sel], reduction="none") * weights[sel]).sum() / weights[sel].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(proj_params + lora_params, 1.0)
        opt.step(), sched.step()
        step += 1
        losses.append(loss.item())
        if step % 5 == 0:
            log(f"step {step}/{args.steps} loss {np.mean(losses[-5:]):.4f} lr {sched.get_last_lr()[0]:.2e} "
                f"{(time.time() - t0) / len(losses):.2f} s/step tokens/seq {input_ids.shape[1]}")
        if step % args.ckpt_every == 0 or step == args.steps:
            torch.save({"params": {k: v.detach().clone() for k, v in trainable.items()}, "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "step": step}, ckpt_path + ".tmp")
            os.replace(ckpt_path + ".tmp", ckpt_path)
        if step % args.eval_every == 0 or step == args.steps:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                log(f"eval step {step}: {json.dumps(quick_eval(model, packer, evals))}")

    recipe = {"vision_feature_layer": vision_feature_layer,
              "lora_r": args.lora_r, "lora_alpha": args.lora_alpha, "lora_targets": list(LORA_TARGETS),
              "steps": args.steps, "seed": args.seed, "train_args": vars(args)}
    save_adapter(adapter_state(model, loras), recipe, args.out)
    log(f"wrote {args.out}/adapter.safetensors, total {(time.time() - t0) / 60:.1f} min this session")


if __name__ == "__main__":
    main()

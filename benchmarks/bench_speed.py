"""Measured prefill latency, decode speed, memory and KV cache of every method on a realistic model.

Model: LLaVA-OneVision-0.5B-shaped (SigLIP-so400m-384 vision tower + Qwen2-0.5B LLM, the real config
numbers, random weights: speed does not depend on weight values), fp32 on CPU. Workloads: videos of 8 and
32 frames (196 tokens a frame after the model's 2x2 pooling) and one 384 px image (anyres).

The vision tower computes the same thing whatever the method, so it runs ONCE per workload (timed and
reported separately) and every method gets the same projector features as `mm_encoder_outputs` (what
`generate` does too); methods that read vision-tower signals (ITP, VisionZip, PruMerge) get the capture
of that one vision forward. What is timed per method is the LLM prefill (incl. the method's own
reduction code), median of --repeats runs after one warm-up, the methods interleaved round by round (a
change of load hits all alike), then --new-tokens cached greedy decode steps continuing the last prefill
(decode tok/s; "decode speedup" = vs the plain model: the reduced KV cache; "hooks ms / new token": the
method's runtime hooks in those steps). "GEMM rate vs plain": the matmul rate (GFLOP/s) of the MLP's shape at
the row's mean tokens per layer over the rate at the plain prompt's length, timed after the prefills: how
much of the speedup / FLOPs gap is the hardware running smaller matmuls less efficiently. "speedup / causal
FLOPs": the speedup over the FLOPs ratio with attention charged for the causal half of the scores that SDPA
computes on an unmasked prompt (`flops.layer_flops(causal=True)`; the SPEC counts the full square, so on long
prompts the plain model's attention costs less than the SPEC says and speedup / FLOPs drops below 1).

Also, unless --no-e2e / --batches none: end-to-end time to first token (the frames' image processor on
PIL frames + vision tower + projector + the method + LLM prefill + the first token, one run each, for
--e2e-methods), and prefill throughput at batch 1 / 4 / 8 of mixed-length image prompts (left padded,
every sample its own token counts) for --batch-methods.

    python benchmarks/bench_speed.py --out benchmarks/results   # full run, writes benchmarks/results/speed.*
    python benchmarks/bench_speed.py --tiny --repeats 1 --budget 0.75   # a smoke run on a tiny config
    python benchmarks/bench_speed.py --device cuda --out benchmarks/results   # LLaVA-OneVision-7B shape, bf16,
        # sdpa, 32 frames, on a CUDA GPU (speed-cuda.*); without one it says so and exits 0
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

import leanvlm
from leanvlm.compat import cache_keyword, cache_of
from leanvlm.flops import LLMShape, llm_prefill_flops
from leanvlm.methods.registry import make_method

IMAGE_TOKEN, VIDEO_TOKEN = 151646, 151647


def build_model(tiny: bool, large: bool = False, device: str = "cpu",
                dtype: torch.dtype = torch.float32) -> LlavaOnevisionForConditionalGeneration:
    """LLaVA-OneVision-0.5B's architecture (config numbers of llava-hf/llava-onevision-qwen2-0.5b-ov-hf);
    large: LLaVA-OneVision-7B's (Qwen2-7B LLM, same SigLIP tower), built directly on `device` in `dtype`."""
    if large:
        vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                                    image_size=384, patch_size=14, vision_use_head=False)
        text = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                           num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6,
                           tie_word_embeddings=False)
        pinpoints = [[384, 384], [384, 768], [768, 384], [768, 768]]
    elif tiny:
        vision = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    image_size=56, patch_size=14, vision_use_head=False)
        text = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
        pinpoints = [[56, 56], [56, 112], [112, 56]]
    else:
        vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                                    image_size=384, patch_size=14, vision_use_head=False)
        text = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                           num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                           tie_word_embeddings=True)
        pinpoints = [[384, 384], [384, 768], [768, 384], [768, 768]]
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                                  video_token_index=VIDEO_TOKEN, vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", image_grid_pinpoints=pinpoints)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # random init on the device: an 8B model never sits in CPU memory
            model = LlavaOnevisionForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model.set_attn_implementation("sdpa")
    model.generation_config.eos_token_id = None  # decode exactly --new-tokens
    return model


@dataclass
class Workload:
    name: str
    frames: int  # 0 for the image
    input_ids: torch.Tensor
    encoded: dict[str, Any]  # mm_encoder_outputs
    vision_seconds: float
    extra: dict[str, Any]  # other forward kwargs (image_sizes)


def build_workload(model, name: str, frames: int, text_before: int = 14, text_after: int = 86) -> Workload:
    """One prompt: ~100 text tokens around the visual span (SPEC 1c's video prompt size)."""
    size = model.config.vision_config.image_size
    device, dtype = model.device, model.dtype
    gen = torch.Generator().manual_seed(frames)
    kind = "video" if frames else "image"
    extra: dict[str, Any] = {}
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        if frames:
            pixels = torch.randn(1, frames, 3, size, size, generator=gen).to(device, dtype)
            encoded = model.model.get_video_features(pixel_values_videos=pixels, vision_feature_layer=-1,
                                                     vision_feature_select_strategy="full", return_dict=True)
            count = encoded.pooler_output.shape[1]
        else:
            pixels = torch.randn(1, 2, 3, size, size, generator=gen).to(device, dtype)  # base tile + one high-res tile
            extra["image_sizes"] = torch.tensor([[size, size]], device=device)
            encoded = model.model.get_image_features(pixel_values=pixels, image_sizes=extra["image_sizes"],
                                                     vision_feature_layer=-1, vision_feature_select_strategy="full",
                                                     return_dict=True)
            count = encoded.pooler_output[0].shape[0]
    synchronize(device)
    seconds = time.perf_counter() - start
    text = torch.randint(1000, 100000, (text_before + text_after,), generator=gen)
    token = VIDEO_TOKEN if frames else IMAGE_TOKEN
    ids = torch.cat([text[:text_before], torch.full((count,), token), text[text_before:]])[None].to(device)
    return Workload(name, frames, ids, {kind: encoded}, seconds, extra)


def synchronize(device: torch.device | str) -> None:
    """Wait for the GPU's queued work (timings on CUDA); nothing on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class PeakRSS:
    """Samples this process's resident memory every 5 ms; `peak_mb` is the peak above the start.
    On CUDA: the peak allocated GPU memory above the start instead."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.cuda = torch.device(device).type == "cuda"

    def _rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self.page

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        self.start, self.peak, self.running = self._rss(), 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self.start) / 2**20
            return
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self._rss())
        self.peak_mb = (self.peak - self.start) / 2**20


@torch.no_grad()
def gemm_rates(model, token_counts: list[int], rounds: int = 5) -> dict[int, float]:
    """GFLOP/s of the LLM's MLP up-projection (a [T, hidden] x [hidden, intermediate] matmul, most of a
    prefill's FLOPs) at each token count T, best of `rounds` interleaved rounds. rate(T) / rate(the plain
    prompt's T) is about the speedup / FLOPs a prefill made of such GEMMs would reach at T tokens a layer."""
    text = model.config.text_config
    device, dtype = model.device, model.dtype
    weight = torch.randn(text.intermediate_size, text.hidden_size, device=device, dtype=dtype)
    inputs = {t: torch.randn(max(t, 1), text.hidden_size, device=device, dtype=dtype) for t in token_counts}
    best = {t: float("inf") for t in inputs}
    for _ in range(rounds + 1):  # the first round warms up
        for t, x in inputs.items():
            synchronize(device)
            start = time.perf_counter()
            torch.nn.functional.linear(x, weight)
            synchronize(device)
            best[t] = min(best[t], time.perf_counter() - start)
    return {t: 2 * x.shape[0] * text.hidden_size * text.intermediate_size / best[t] / 1e9 for t, x in inputs.items()}


def kv_cache_bytes(cache) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in cache.layers)


@torch.no_grad()
def greedy_decode_seconds(model, prefill_output, new_tokens: int) -> float:
    """Seconds for `new_tokens` cached greedy steps continuing a prefill (batch of one, no padding)."""
    cache, token = cache_of(prefill_output), prefill_output.logits[:, -1:].argmax(-1)
    synchronize(model.device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        step = model(input_ids=token, use_cache=True, **{cache_keyword(model.forward): cache})
        cache, token = cache_of(step), step.logits[:, -1:].argmax(-1)
    synchronize(model.device)
    return time.perf_counter() - start


def random_frames(count: int, seed: int) -> list[Any]:
    """`count` random 480x640 RGB PIL frames (what a decoded video or a photo hands the processor)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, size=(480, 640, 3), dtype=np.uint8)) for _ in range(count)]


@torch.no_grad()
def measure_e2e(model, workload: Workload, name: str, method) -> dict[str, Any]:
    """Time to first token from PIL frames: the image processor (resize + normalise to the tower's size,
    as the video processor does; the image workload's two anyres tiles as two frames), the vision tower
    and projector, the method, the LLM prefill and the first greedy token. One run after the timed prefill
    runs warmed everything up. The token ids are the workload's (tokenising ~100 words is negligible)."""
    from transformers import SiglipImageProcessorPil

    size = model.config.vision_config.image_size
    processor = SiglipImageProcessorPil(size={"height": size, "width": size})
    frames = random_frames(max(workload.frames, 2), workload.frames)
    applied = method.apply(model) if method is not None else None
    try:
        synchronize(model.device)
        start = time.perf_counter()
        pixels = processor(frames, return_tensors="pt").pixel_values.to(model.device, model.dtype)[None]
        processed = time.perf_counter() - start
        if workload.frames:
            inputs = {"pixel_values_videos": pixels}
        else:
            inputs = {"pixel_values": pixels, "image_sizes": workload.extra["image_sizes"]}
        out = model(input_ids=workload.input_ids, **inputs, logits_to_keep=1)
        int(out.logits[0, -1].argmax())  # the first token, on the host
        synchronize(model.device)
        total = time.perf_counter() - start
    finally:
        if applied is not None:
            applied.remove()
    return {"workload": workload.name, "method": name, "ttft_s": total, "processor_s": processed,
            "model_s": total - processed}


def mixed_batch(workload: Workload, batch: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` prompts made from the workload's: sample b drops 12 * b of the text tokens after the visual
    span (at most all but one of them; mixed lengths), left padded. -> input_ids, attention_mask [batch, T]."""
    ids = workload.input_ids[0]
    after = ids.numel() - 1 - int((ids == IMAGE_TOKEN).nonzero()[-1, 0])  # text tokens after the visual span
    rows = [ids[: ids.numel() - min(12 * b, after - 1)] for b in range(batch)]
    width = max(r.numel() for r in rows)
    input_ids = torch.full((batch, width), pad_id, dtype=ids.dtype, device=ids.device)
    mask = torch.zeros((batch, width), dtype=torch.long, device=ids.device)
    for b, row in enumerate(rows):
        input_ids[b, width - row.numel():] = row
        mask[b, width - row.numel():] = 1
    return input_ids, mask


@torch.no_grad()
def measure_batch(model, workload: Workload, name: str, method, batch: int, repeats: int) -> dict[str, Any]:
    """Prefill throughput (prompts/s) of a left-padded batch of mixed-length prompts about one image each
    (the workload's projector features for every sample), median of `repeats` runs after a warm-up."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    pad_id = 151643
    input_ids, mask = mixed_batch(workload, batch, pad_id)
    encoded = workload.encoded["image"]
    features = BaseModelOutputWithPooling(pooler_output=list(encoded.pooler_output) * batch)
    kwargs = dict(input_ids=input_ids, attention_mask=mask, mm_encoder_outputs={"image": features},
                  image_sizes=workload.extra["image_sizes"].expand(batch, -1))
    applied = method.apply(model) if method is not None else None
    try:
        times = []
        for run in range(repeats + 1):
            synchronize(model.device)
            start = time.perf_counter()
            model(**kwargs, use_cache=True, logits_to_keep=1)
            synchronize(model.device)
            if run:
                times.append(time.perf_counter() - start)
        tokens = [s.layer_tokens[0] for s in method.stats.samples] if method is not None else mask.sum(1).tolist()
    finally:
        if applied is not None:
            applied.remove()
    seconds = statistics.median(times)
    return {"workload": workload.name, "method": name, "batch": batch, "prefill_s": seconds,
            "prompts_per_s": batch / seconds, "prompt_tokens": mask.sum(1).tolist(), "layer0_tokens": tokens}


def methods(model, workload: Workload, budget: float) -> dict[str, leanvlm.Method | None]:
    visual = int((workload.input_ids == (VIDEO_TOKEN if workload.frames else IMAGE_TOKEN)).sum())
    text = workload.input_ids.shape[1] - visual
    frames = max(workload.frames, 1)
    return {
        "none": None,
        "aim": leanvlm.AIM(),
        f"aim-budget-1/{1 / budget:.3g}": leanvlm.AIM.for_budget(model, budget, visual_tokens=visual // frames, frames=frames,
                                                 text_tokens=text + visual % frames),
        "itp": leanvlm.ITP(),
        "fastv": leanvlm.FastV(),
        "visionzip": make_method("visionzip"),
        "prumerge+": make_method("prumerge+"),
        "pyramiddrop": make_method("pyramiddrop"),
        "random": make_method("random", keep=0.25),
        "pool": make_method("pool", keep=0.25),
        # wave-2 peers: the image ones at a quarter of the visual tokens, the video ones at their paper's 10%
        **{name: make_method(name, keep=0.25) for name in ("divprune", "cdpruner", "vispruner", "dart")},
        "holitom": make_method("holitom"),
        "fastvid": make_method("fastvid"),
    }


def measure_interleaved(model, workload: Workload, chosen: dict[str, leanvlm.Method | None], repeats: int,
                        new_tokens: int, capture, on_step=lambda: None) -> list[dict[str, Any]]:
    """One row per method of `chosen` on one workload. The prefills interleave: round 0 (warm-up) and each
    of the `repeats` timed rounds run every method once in turn, so a change of load on the machine hits
    every method alike and the speedups (ratios to the plain model) compare like with like. The last
    round's prefill of each method gives its KV-cache size and stats and is continued by
    `new_tokens` cached greedy steps (decode tok/s); peak memory is the warm-up round's (untimed). on_step()
    is called after every prefill (progress)."""
    kwargs = dict(input_ids=workload.input_ids, mm_encoder_outputs=workload.encoded, **workload.extra)
    times: dict[str, list[float]] = {name: [] for name in chosen}
    peak_mb: dict[str, float] = {}
    last: dict[str, dict[str, Any]] = {}
    for run in range(repeats + 1):
        for name, method in chosen.items():
            applied = method.apply(model) if method is not None else None
            try:
                if applied is not None and applied._probe is not None:
                    # the one vision forward of this workload (see the module docstring)
                    applied._probe.history = capture.history
                gc.collect()
                # Peak memory is sampled in the untimed warm-up round only: the sampler is a Python thread
                # polling every 5 ms, and its GIL turns slow the Python-heavy reduction code and the
                # short reduced prefills far more than the plain one.
                with torch.no_grad(), (PeakRSS(model.device) if run == 0 else contextlib.nullcontext()) as memory:
                    start = time.perf_counter()
                    out = model(**kwargs, use_cache=True, logits_to_keep=1)
                    synchronize(model.device)
                    elapsed = time.perf_counter() - start
                if run == 0:
                    peak_mb[name] = memory.peak_mb
                else:
                    times[name].append(elapsed)
                if run == repeats:
                    # decode steps add their hooks' time to stats.reduction_seconds: read the prefill's first
                    stats = method.stats if method is not None else None
                    prefill_reduction = stats.reduction_seconds if stats is not None else 0.0
                    decode_s = greedy_decode_seconds(model, out, new_tokens)
                    last[name] = {"cache_bytes": kv_cache_bytes(cache_of(out)), "peak_mb": peak_mb[name],
                                  "stats": stats, "reduction_s": prefill_reduction, "decode_s": decode_s,
                                  "decode_reduction_s": (stats.reduction_seconds if stats is not None else 0.0)
                                  - prefill_reduction}
                del out
            finally:
                if applied is not None:
                    applied.remove()
            on_step()
    return [_row(model, workload, name, method, times[name], last[name], new_tokens) for name, method in chosen.items()]


def _row(model, workload: Workload, name: str, method, times: list[float], last: dict[str, Any],
         new_tokens: int) -> dict[str, Any]:
    prefill = statistics.median(times)
    layers = model.config.text_config.num_hidden_layers
    stats = last["stats"]
    row = {
        "workload": workload.name, "method": name, "config": repr(method) if method is not None else "plain model",
        "prefill_s": prefill, "prefill_runs_s": times,
        "decode_tokens_per_s": new_tokens / last["decode_s"],
        "peak_rss_mb": last["peak_mb"], "kv_cache_mb": last["cache_bytes"] / 2**20,
        "tokens_in": int(workload.input_ids.shape[1]),
        # the method's hooks during the decode steps, per step (the runtime's cost on every new token)
        "decode_reduction_ms_per_token": 1000 * last["decode_reduction_s"] / new_tokens,
    }
    if stats is not None:
        sample = stats.samples[0]
        # the same ratio with the attention scores a causal kernel computes (n (n + 1) / 2 pairs, not n^2): what
        # SDPA runs on an unmasked prompt; the SPEC's FLOPs overstate the plain prompt's attention by up to 2x
        shape, full = LLMShape.from_config(model.config), sample.layer_tokens[0] + sample.visual_in - sample.visual_into_llm
        causal_ratio = (llm_prefill_flops([full] * layers, shape, causal=True)
                        / llm_prefill_flops(sample.layer_tokens, shape, causal=True))
        row.update(visual_into_llm=sample.visual_into_llm, mean_tokens_per_layer=sum(sample.layer_tokens) / layers,
                   flops_ratio=stats.flops_ratio, causal_flops_ratio=causal_ratio, reduction_s=last["reduction_s"],
                   reduction_share=last["reduction_s"] / prefill)
    else:
        row.update(visual_into_llm=None, mean_tokens_per_layer=float(workload.input_ids.shape[1]), flops_ratio=1.0,
                   causal_flops_ratio=1.0, reduction_s=0.0, reduction_share=0.0)
    return row


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="*", default=None, help="video workloads (frames; default 8 32, CUDA: 32)")
    parser.add_argument("--no-image", action="store_true", help="skip the single-image workload")
    parser.add_argument("--methods", nargs="*", default=None, help="subset of methods (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="timed prefill runs after one warm-up")
    parser.add_argument("--new-tokens", type=int, default=64, help="cached greedy decode steps timed (decode tok/s)")
    parser.add_argument("--budget", type=float, default=1 / 7, help="FLOPs fraction for AIM.for_budget")
    parser.add_argument("--tiny", action="store_true", help="tiny config smoke run (use --budget 0.75: the LM head dominates)")
    parser.add_argument("--device", default="cpu", help="cpu (LLaVA-OneVision-0.5B shape, fp32) or cuda "
                        "(LLaVA-OneVision-7B shape, bf16, sdpa; exits 0 with a message without a CUDA GPU)")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end time-to-first-token table")
    parser.add_argument("--e2e-methods", nargs="*", default=["none", "aim"])
    parser.add_argument("--batches", nargs="*", default=["1", "4", "8"], help="batch sizes of the throughput table ('none': skip)")
    parser.add_argument("--batch-methods", nargs="*", default=["none", "aim"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("runs"),
                        help="output directory (default ./runs; the committed tables are in benchmarks/results)")
    parser.add_argument("--name", default=None, help="output file stem (default: speed, speed-tiny or speed-cuda)")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print(f"bench_speed: --device {args.device} needs a CUDA GPU and torch with CUDA; none here "
              f"(torch {torch.__version__}), skipped.")
        return []
    if args.device != "cpu" and not cuda:
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.frames is None:
        args.frames = [32] if cuda else [8, 32]
    if args.threads:
        torch.set_num_threads(args.threads)
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    model = build_model(args.tiny, large=cuda and not args.tiny, device=args.device,
                        dtype=torch.bfloat16 if cuda else torch.float32)
    specs = [(f"video-{f}f", f) for f in args.frames] + ([] if args.no_image else [("image", 0)])
    batches = [] if args.batches in ([], ["none"]) else [int(b) for b in args.batches]
    rows: list[dict[str, Any]] = []
    e2e: list[dict[str, Any]] = []
    throughput: list[dict[str, Any]] = []
    with Progress(console=console) as progress:
        for workload_name, frames in specs:
            from leanvlm.models import get_adapter

            capture = get_adapter(model).install_vision_probe()
            workload = build_workload(model, workload_name, frames, *((2, 4) if args.tiny else ()))
            capture.remove()
            candidates = methods(model, workload, args.budget)
            chosen = {k: v for k, v in candidates.items() if args.methods is None or k in args.methods}
            task = progress.add_task(f"{workload_name} ({workload.input_ids.shape[1]} tokens, {len(chosen)} methods "
                                     f"interleaved)", total=(args.repeats + 1) * len(chosen))
            measured = measure_interleaved(model, workload, chosen, args.repeats, args.new_tokens, capture,
                                           on_step=lambda: progress.advance(task))
            # after the timed prefills: the GEMM rate at each row's mean tokens per layer vs the whole prompt's
            rates = gemm_rates(model, [workload.input_ids.shape[1]] + [round(r["mean_tokens_per_layer"]) for r in measured])
            for row in measured:
                row["vision_s"] = workload.vision_seconds
                row["gemm_rate_vs_plain"] = rates[round(row["mean_tokens_per_layer"])] / rates[workload.input_ids.shape[1]]
                rows.append(row)
            if not args.no_e2e:
                for name in args.e2e_methods:  # interleaved per workload: the load hits each alike
                    e2e.append(measure_e2e(model, workload, name, candidates[name]))
            if frames == 0:
                for batch in batches:
                    for name in args.batch_methods:
                        throughput.append(measure_batch(model, workload, name, candidates[name], batch, args.repeats))
    base = {r["workload"]: r for r in rows if r["method"] == "none"}
    for row in rows:
        if row["workload"] in base:
            row["speedup"] = base[row["workload"]]["prefill_s"] / row["prefill_s"]
            row["speedup_vs_flops"] = row["speedup"] / row["flops_ratio"]
            row["speedup_vs_causal_flops"] = row["speedup"] / row["causal_flops_ratio"]
            row["decode_speedup"] = row["decode_tokens_per_s"] / base[row["workload"]]["decode_tokens_per_s"]
    e2e_base = {r["workload"]: r["ttft_s"] for r in e2e if r["method"] == "none"}
    for row in e2e:
        if row["workload"] in e2e_base:
            row["ttft_speedup"] = e2e_base[row["workload"]] / row["ttft_s"]
    write_results(rows, args, console, e2e, throughput)
    return rows


def write_results(rows: list[dict[str, Any]], args: argparse.Namespace, console, e2e: list[dict[str, Any]],
                  throughput: list[dict[str, Any]]) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    cuda = args.device.startswith("cuda")
    stem = args.name or ("speed-tiny" if args.tiny else "speed-cuda" if cuda else "speed")
    command = "python benchmarks/bench_speed.py " + " ".join(sys.argv[1:])
    meta = {"command": command.strip(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
            "device": torch.cuda.get_device_name() if cuda else "cpu", "load_average": os.getloadavg()}
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows, "e2e": e2e,
                                                       "throughput": throughput}, indent=1))
    memory = "peak GPU MB" if cuda else "peak RSS MB"
    header = ("| workload | method | tokens into LLM (mean/layer) | prefill s | speedup | FLOPs ratio | speedup / FLOPs "
              f"| speedup / causal FLOPs | GEMM rate vs plain | reduction % | decode tok/s | decode speedup | hooks ms / new token | {memory} "
              "| KV cache MB |")
    lines = [f"Command: `{meta['command']}` (torch {meta['torch']}, {meta['device']}, {meta['threads']} threads, "
             f"{meta['date']}, load average {meta['load_average'][0]:.1f} at the end)", "", header, "|" + "---|" * 15]
    for r in rows:
        lines.append(f"| {r['workload']} | {r['method']} | {r['mean_tokens_per_layer']:.0f} | {r['prefill_s']:.2f} "
                     f"| {r.get('speedup', float('nan')):.2f}x | {r['flops_ratio']:.2f}x | {r.get('speedup_vs_flops', float('nan')):.2f} "
                     f"| {r.get('speedup_vs_causal_flops', float('nan')):.2f} | {r['gemm_rate_vs_plain']:.2f} "
                     f"| {100 * r['reduction_share']:.1f} | {r['decode_tokens_per_s']:.1f} | {r.get('decode_speedup', float('nan')):.2f}x "
                     f"| {r['decode_reduction_ms_per_token']:.2f} | {r['peak_rss_mb']:.0f} | {r['kv_cache_mb']:.1f} |")
    if e2e:
        lines += ["", f"End-to-end time to first token (processor + vision tower + method + prefill + first token, one run):", "",
                  "| workload | method | TTFT s | of which processor s | speedup |", "|---|---|---|---|---|"]
        for r in e2e:
            lines.append(f"| {r['workload']} | {r['method']} | {r['ttft_s']:.2f} | {r['processor_s']:.2f} "
                         f"| {r.get('ttft_speedup', float('nan')):.2f}x |")
    if throughput:
        lines += ["", "Prefill throughput, batches of mixed-length image prompts (left padded, per-sample token counts):", "",
                  "| batch | method | prompt tokens | tokens at layer 0 | prefill s | prompts / s |", "|---|---|---|---|---|---|"]
        for r in throughput:
            lines.append(f"| {r['batch']} | {r['method']} | {min(r['prompt_tokens'])}-{max(r['prompt_tokens'])} "
                         f"| {min(r['layer0_tokens'])}-{max(r['layer0_tokens'])} | {r['prefill_s']:.2f} | {r['prompts_per_s']:.2f} |")
    table = "\n".join(lines) + "\n"
    (args.out / f"{stem}.md").write_text(table)
    console.print(table)
    plot(rows, args.out / f"{stem}.png")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Left: measured prefill speedup vs the analytic FLOPs ratio (log-log; on the diagonal the speedup
    equals the FLOPs saved). Right: speedup / FLOPs vs tokens per layer, with each row's GEMM rate vs plain
    (what the CPU's matmuls alone allow at that size) as hollow markers and its speedup / causal FLOPs
    (attention charged for the causal half the kernel computes) as crosses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    reduced = [r for r in rows if r["method"] != "none" and "speedup" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5), dpi=120)
    top = max([r["flops_ratio"] for r in reduced] + [r["speedup"] for r in reduced] + [2.0]) * 1.3
    left.plot([1, top], [1, top], color="gray", lw=1, label="speedup = FLOPs ratio")
    left.plot([1, top], [0.8, 0.8 * top], color="gray", lw=1, ls=":", label="0.8 of it")
    for index, workload in enumerate(dict.fromkeys(r["workload"] for r in reduced)):
        points = [r for r in reduced if r["workload"] == workload]
        color = f"C{index}"
        left.scatter([r["flops_ratio"] for r in points], [r["speedup"] for r in points], color=color, label=workload)
        right.scatter([r["mean_tokens_per_layer"] for r in points], [r["speedup_vs_flops"] for r in points], color=color,
                      label=f"{workload}: measured")
        right.scatter([r["mean_tokens_per_layer"] for r in points], [r["gemm_rate_vs_plain"] for r in points],
                      facecolors="none", edgecolors=color, label=f"{workload}: GEMM rate vs plain")
        causal = [r for r in points if "speedup_vs_causal_flops" in r]
        if causal:
            right.scatter([r["mean_tokens_per_layer"] for r in causal], [r["speedup_vs_causal_flops"] for r in causal],
                          marker="x", color=color, label=f"{workload}: speedup / causal FLOPs")
        for r in points:  # name the AIM rows and those below 0.8 of their FLOPs ratio
            if r["method"].startswith("aim") or r["speedup_vs_flops"] < 0.8:
                for ax, xy in ((left, (r["flops_ratio"], r["speedup"])),
                               (right, (r["mean_tokens_per_layer"], r["speedup_vs_flops"]))):
                    ax.annotate(r["method"], xy, fontsize=7, xytext=(3, 3), textcoords="offset points")
    left.set(xscale="log", yscale="log", xlabel="analytic prefill FLOPs ratio (full / method)",
             ylabel="measured prefill speedup", title="Speedup vs FLOPs saved")
    right.axhline(1.0, color="gray", lw=1)
    right.axhline(0.8, color="gray", lw=1, ls=":")
    right.set(xscale="log", xlabel="tokens per LLM layer (mean over layers)", ylabel="speedup / FLOPs ratio",
              title="Where the gap comes from: small matmuls, causal attention")
    right.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    right.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())  # 200, 500, 1000 rather than 2 x 10^2
    right.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for ax in (left, right):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("LLaVA-OneVision-0.5B shape, fp32 CPU, prefill (bench_speed.py)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()

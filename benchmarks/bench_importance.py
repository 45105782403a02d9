"""Cost of AIM's token-importance scoring at each pruning layer, PageRank (SPEC 1b) vs the text option.

Shapes are those of `bench_speed.py`'s AIM default at 32 frames on the LLaVA-OneVision-0.5B shape (Qwen2-0.5B:
14 query heads, 2 key/value heads, head dim 64): the token count each pruning layer scores comes from
`AIM.tokens_per_layer`, for every layer in [l1, l2) (the last one, where keep(l) = 0, drops every visual
token without ranking at run time, so its row is an upper bound that AIM does not pay). Inputs are random
(the cost does not depend on values). Per layer: median seconds
of `pagerank_importance` (float32, M built once chunk by chunk, 5 propagation steps) and of the text
option (`received_attention` from the question's rows), and the seconds of one plain decoder layer's
forward at that length for scale.

    python benchmarks/bench_importance.py            # writes benchmarks/results/importance.{md,json}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

from leanvlm import AIM
from leanvlm.ops.attention import received_attention
from leanvlm.ops.importance import pagerank_importance
from leanvlm.ops.schedule import default_prune_layers

RESULTS = Path(__file__).parent / "results"
QWEN2_05B = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                        num_key_value_heads=2, rope_theta=1e6)


def median_seconds(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--question-tokens", type=int, default=86, help="text tokens after the video (bench_speed)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    config = QWEN2_05B
    config._attn_implementation = "sdpa"
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    method = AIM()
    tokens = method.tokens_per_layer(config, visual_tokens=196, text_tokens=100, frames=args.frames, kind="video")
    l1, l2 = default_prune_layers(config.num_hidden_layers)  # 12, 19 for 24 layers
    layer = Qwen2DecoderLayer(config, 0).eval()
    rotary = Qwen2RotaryEmbedding(config)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for index in range(l1, l2):
        n = tokens[index]
        queries = torch.randn(1, heads, n, head_dim, generator=gen)
        keys = torch.randn(1, kv_heads, n, head_dim, generator=gen)
        pos = torch.arange(n)[None]
        valid = torch.ones(1, n, dtype=torch.bool)
        question = torch.arange(n - args.question_tokens, n)[None]
        hidden = torch.randn(1, n, config.hidden_size, generator=gen)
        embeddings = rotary(hidden, pos)
        rows.append({
            "layer": index, "tokens": n,
            "pagerank_s": median_seconds(lambda: pagerank_importance(queries, keys, pos, pos, valid, head_dim ** -0.5),
                                         args.repeats),
            "text_s": median_seconds(lambda: received_attention(queries[:, :, question[0]], keys, question, pos, valid,
                                                                head_dim ** -0.5), args.repeats),
            "decoder_layer_s": median_seconds(lambda: layer(hidden, attention_mask=None, position_embeddings=embeddings,
                                                            position_ids=pos), args.repeats),
        })
    write(rows, args)
    return rows


def write(rows: list[dict], args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    command = ("python benchmarks/bench_importance.py " + " ".join(sys.argv[1:])).strip()
    meta = {"command": command, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d")}
    (args.out / "importance.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"Command: `{command}` (torch {meta['torch']}, {meta['threads']} threads, {meta['date']})", "",
             "| layer | tokens scored | PageRank s | text s | one decoder layer s | PageRank / layer |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['tokens']} | {r['pagerank_s']:.4f} | {r['text_s']:.4f} "
                     f"| {r['decoder_layer_s']:.4f} | {r['pagerank_s'] / r['decoder_layer_s']:.2f} |")
    total = {k: sum(r[k] for r in rows) for k in ("pagerank_s", "text_s", "decoder_layer_s")}
    lines.append(f"| total | | {total['pagerank_s']:.3f} | {total['text_s']:.3f} | {total['decoder_layer_s']:.3f} "
                 f"| {total['pagerank_s'] / total['decoder_layer_s']:.2f} |")
    text = "\n".join(lines) + "\n"
    (args.out / "importance.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

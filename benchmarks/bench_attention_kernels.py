"""What one attention call costs on this machine with and without a mask: SDPA's causal fast path vs the
explicit masks a reduced prompt can need (a padded batch, proportional attention's key bias).

The SPEC's FLOPs (and the papers') charge attention for the full n x n scores. SDPA called with
`is_causal` and no mask (what transformers does for an unpadded prompt) computes only the causal half on
kernels that skip masked blocks; with any explicit mask it computes the whole square. How much that matters
depends on the machine: this prints, per prompt length, the median seconds of
- causal: `is_causal=True`, no mask (the plain model's prefill),
- float mask / bool mask: the same causal rule as an explicit additive / boolean mask,
- key bias, extra channel: `runtime.attention.key_biased_sdpa` with a log(size) bias on a quarter of the
  keys (causal path, head dim padded by 8),
- key bias, float mask: the same bias inside an additive causal mask (eager-style),
and the ratio masked / causal. Shapes: Qwen2-0.5B's attention (14 query heads, 2 KV heads, head dim 64).

    python benchmarks/bench_attention_kernels.py --lengths 1669 6373 --json runs/attention-kernels.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from bench_importance import median_seconds as timed  # noqa: E402
from leanvlm.runtime.attention import key_biased_sdpa  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1669, 6373], help="prompt lengths (tokens)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    heads, kv_heads, dim = 14, 2, 64
    module = nn.Module()
    module.is_causal, module.num_key_value_groups = True, heads // kv_heads  # what transformers reads
    rows = []
    gen = torch.Generator().manual_seed(0)
    for n in args.lengths:
        q = torch.randn(1, heads, n, dim, generator=gen)
        k, v = (torch.randn(1, kv_heads, n, dim, generator=gen) for _ in range(2))
        bias = torch.zeros(1, n)
        bias[0, n // 8: n // 8 + n // 4] = torch.log(torch.randint(1, 5, (n // 4,), generator=gen).float())
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        float_mask = torch.zeros(n, n).masked_fill(~causal, torch.finfo(torch.float32).min)[None, None]
        biased_mask = float_mask + bias[:, None, None, :]
        sdpa = lambda mask=None, causal_flag=False: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal_flag, enable_gqa=True)
        row = {"tokens": n,
               "causal_s": timed(lambda: sdpa(causal_flag=True), args.repeats),
               "float_mask_s": timed(lambda: sdpa(float_mask), args.repeats),
               "bool_mask_s": timed(lambda: sdpa(causal[None, None]), args.repeats),
               "key_bias_channel_s": timed(lambda: key_biased_sdpa(module, q, k, v, None, key_bias=bias), args.repeats),
               "key_bias_mask_s": timed(lambda: sdpa(biased_mask), args.repeats)}
        row["masked_over_causal"] = row["float_mask_s"] / row["causal_s"]
        row["bias_mask_over_channel"] = row["key_bias_mask_s"] / row["key_bias_channel_s"]
        rows.append(row)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| tokens | causal s | float mask s | bool mask s | masked / causal | key bias: channel s | key bias: mask s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {r['causal_s']:.3f} | {r['float_mask_s']:.3f} | {r['bool_mask_s']:.3f} "
              f"| {r['masked_over_causal']:.2f} | {r['key_bias_channel_s']:.3f} | {r['key_bias_mask_s']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()

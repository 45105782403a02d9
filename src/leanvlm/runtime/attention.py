"""Proportional attention on SDPA's causal fast path.

Proportional attention adds log(size) to the logits of every key that stands for `size` merged patches.
Through SDPA that needs an explicit additive mask, and a mask makes the kernel compute the whole square
of scores, where the unreduced prompt (no mask, `is_causal`) computes only the lower half: on a 2-core
CPU the masked call takes 1.69x the causal one at 1,669 tokens, 2.11x at 6,373 (docs/benchmarks.md,
"Causal kernels").

The bias can instead ride in the dot product: with one more channel, q' = [q, 1] and k' = [k, b / scale],

    scale * q' . k' = scale * q . k + b,

so `key_biased_sdpa` runs SDPA causal with the given scale on [q, 1, 0...] / [k, b / scale, 0...] /
[v, 0...] (zero-padded to a multiple of 8 channels, which fused kernels want; zeros add nothing to the
dot products) and drops the extra output channels. The runtime passes `key_bias` only in prefill layers
whose mask would otherwise be the plain causal one and that compute on at least CHANNEL_MIN_TOKENS slots;
everything else goes to transformers' own SDPA.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

#: the attention implementation name the runtime switches an SDPA language model to while a method with
#: proportional attention is applied (same masks as "sdpa"; same results up to float rounding)
KEY_BIAS_SDPA = "leanvlm_key_bias_sdpa"

#: shortest layer input (slots) that takes the extra channel; shorter ones keep the bias in a mask. On the
#: 2-core AVX2 CPU (`python benchmarks/bench_attention_kernels.py`, Qwen2-0.5B heads) the channel's copies
#: cost more than the masked square at 362 tokens (8 vs 6 ms a call), break even near 1,024 and win from
#: there (76 vs 118 ms at 1,669 tokens, 0.90 vs 1.54 s at 6,373)
CHANNEL_MIN_TOKENS = 1024


def key_biased_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None,
                    key_bias: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, plus `key_bias` [B, K] (added to every query's logit of key k) carried
    in an extra channel so that no mask is needed. query [B, H, Q, d], key / value [B, H_kv, K, d];
    returns ([B, Q, H, d], None) like the SDPA function it calls."""
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if key_bias is None:
        return sdpa(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    head_dim = query.shape[-1]
    scale = head_dim ** -0.5 if scaling is None else scaling
    extra = 8 - head_dim % 8  # >= 1: the bias channel, then zeros up to a multiple of 8
    q_pad = query.new_zeros(*query.shape[:-1], extra)
    q_pad[..., 0] = 1.0
    k_pad = key.new_zeros(*key.shape[:-1], extra)
    k_pad[..., 0] = (key_bias / scale).to(key.dtype)[:, None, :]
    query, key = torch.cat([query, q_pad], -1), torch.cat([key, k_pad], -1)
    value = torch.cat([value, value.new_zeros(*value.shape[:-1], extra)], -1)
    out, _ = sdpa(module, query, key, value, attention_mask, scaling=scale, **kwargs)
    return out[..., :head_dim], None


def register_key_biased_sdpa() -> None:
    """Make KEY_BIAS_SDPA a valid attn_implementation (idempotent): our attention function, SDPA's masks."""
    AttentionInterface.register(KEY_BIAS_SDPA, key_biased_sdpa)
    AttentionMaskInterface.register(KEY_BIAS_SDPA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])

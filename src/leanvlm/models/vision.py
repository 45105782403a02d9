"""Signals from inside a ViT vision tower that pre-LLM stages rank patches by.

A `VisionProbe` captures, during the model's own vision forward, the input of one encoder layer's
attention (after its norm) and that layer's output; `vision_signals` turns them into per-patch scores
recomputed from the layer's q/k projections, so any attention backend (eager, sdpa) works.

Signals (each [N, T] for N images of T patch tokens, or [N, T, D] for "keys"):
- "cls_attention": attention of the CLS query to every patch key, head-averaged (softmax over all
  tokens, including CLS, as in the model).
- "cls_similarity": cosine similarity of the CLS and patch hidden states at the layer's output.
- "keys": the layer's patch keys, heads concatenated (VisionZip merges contextual tokens by these).
Towers without a CLS token (SigLIP) use the mean of all tokens as the query / reference vector instead;
`has_cls=False` marks that substitute (reported by the stages that use it).
"""

from __future__ import annotations

from contextlib import contextmanager
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

SIGNALS = frozenset({"cls_attention", "cls_similarity", "keys"})


def encoder_layers(tower: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a vision tower (CLIP, SigLIP, DINOv2, Qwen2-VL layouts)."""
    for path in ("vision_model.encoder.layers", "encoder.layers", "encoder.layer", "blocks"):
        module = tower
        for name in path.split("."):
            module = getattr(module, name, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList):
            return module
    raise ValueError(f"cannot find the encoder layers of vision tower {type(tower).__name__}")


def layer_attention(layer: nn.Module) -> nn.Module:
    """The self-attention module of an encoder layer (`self_attn` in CLIP/SigLIP, `attention` in DINOv2)."""
    for name in ("self_attn", "attention", "attn"):
        if hasattr(layer, name):
            return getattr(layer, name)
    raise ValueError(f"cannot find the attention module of {type(layer).__name__}")


@dataclass
class Captured:
    attn_input: torch.Tensor | None = None  # [N, S, D] attention input (normed)
    output: torch.Tensor | None = None  # [N, S, D] layer output


@contextmanager
def probe(layer: nn.Module) -> Iterator[Captured]:
    """Capture one encoder layer's attention input and output while the block runs."""
    captured = Captured()

    def before_attention(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.attn_input = args[0] if args else kwargs["hidden_states"]

    def after_layer(module: nn.Module, args: tuple, output: object) -> None:
        captured.output = output[0] if isinstance(output, tuple) else output

    handles = [layer_attention(layer).register_forward_pre_hook(before_attention, with_kwargs=True),
               layer.register_forward_hook(after_layer)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def feature_layer_index(vision_feature_layer: int, num_layers: int) -> int:
    """Encoder layer whose output is hidden_states[vision_feature_layer] (hidden_states[0] = embeddings)."""
    index = vision_feature_layer % (num_layers + 1) - 1
    if index < 0:
        raise ValueError(f"vision_feature_layer {vision_feature_layer} selects the embeddings, not an encoder layer")
    return index


def _heads(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[N, S, H*d] -> [N, H, S, d]."""
    return x.unflatten(-1, (-1, attn.head_dim)).transpose(1, 2)


@torch.no_grad()
def vision_signals(attn: nn.Module, captured: Captured, needs: frozenset[str], has_cls: bool, prefix: int) -> dict[str, torch.Tensor]:
    """Compute the requested signals for the patch tokens `prefix:` of every image (see module doc).

    attn: the layer's attention module (q_proj, k_proj, head_dim, scale/scaling). prefix: tokens before
    the patches that the projector drops (1 for a CLS the LLaVA "default" strategy removes).
    """
    unknown = needs - SIGNALS
    if unknown:
        raise ValueError(f"unknown vision signals {sorted(unknown)}; known: {sorted(SIGNALS)}")
    hidden = captured.attn_input.float()
    signals: dict[str, torch.Tensor] = {}
    weight = {name: p.float() for name, p in attn.named_parameters()}
    keys = nn.functional.linear(hidden, weight["k_proj.weight"], weight.get("k_proj.bias"))  # [N, S, H*d]
    if "cls_attention" in needs:
        reference = hidden[:, :1] if has_cls else hidden.mean(dim=1, keepdim=True)
        query = _heads(attn, nn.functional.linear(reference, weight["q_proj.weight"], weight.get("q_proj.bias")))
        scale = getattr(attn, "scale", None) or attn.scaling
        probs = torch.softmax(query @ _heads(attn, keys).transpose(-1, -2) * scale, dim=-1)  # [N, H, 1, S]
        signals["cls_attention"] = probs.mean(dim=1)[:, 0, prefix:]
    if "cls_similarity" in needs:
        out = captured.output.float()
        reference = out[:, :1] if has_cls else out.mean(dim=1, keepdim=True)
        signals["cls_similarity"] = torch.cosine_similarity(out[:, prefix:], reference, dim=-1)
    if "keys" in needs:
        signals["keys"] = keys[:, prefix:]
    return signals

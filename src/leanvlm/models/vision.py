"""Signals from inside a ViT vision tower that pre-LLM stages rank patches by.

A `VisionProbe` captures, during the model's own vision forwards, the input of one encoder layer's
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


class VisionProbe:
    """Captures one encoder layer's attention input (after its norm) and output at every vision forward.

    Installed for as long as a method that needs vision signals is applied: `generate` encodes the
    images before the first forward (transformers passes them on as `mm_encoder_outputs`), so the
    capture must already be in place then. Each vision forward overwrites the previous capture.
    """

    def __init__(self, layer: nn.Module):
        self.attn = layer_attention(layer)
        self.attn_input: torch.Tensor | None = None  # [N, S, D]
        self.output: torch.Tensor | None = None  # [N, S, D]
        self._handles = [self.attn.register_forward_pre_hook(self._before_attention, with_kwargs=True),
                         layer.register_forward_hook(self._after_layer)]

    def _before_attention(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.attn_input = (args[0] if args else kwargs["hidden_states"]).detach()

    def _after_layer(self, module: nn.Module, args: tuple, output: object) -> None:
        self.output = (output[0] if isinstance(output, tuple) else output).detach()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


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
def vision_signals(probe: VisionProbe, needs: frozenset[str], has_cls: bool, prefix: int) -> dict[str, torch.Tensor]:
    """Compute the requested signals for the patch tokens `prefix:` of every image of the last capture.

    prefix: tokens before the patches that the projector drops (1 for the CLS that LLaVA's "default"
    strategy removes). The attention module must have q_proj, k_proj, head_dim and scale/scaling.
    """
    unknown = needs - SIGNALS
    if unknown:
        raise ValueError(f"unknown vision signals {sorted(unknown)}; known: {sorted(SIGNALS)}")
    if probe.attn_input is None:
        raise ValueError("vision signals are needed but the vision tower has not run while the method was applied "
                         "(pass pixel values, not precomputed features, to the model)")
    attn, hidden = probe.attn, probe.attn_input.float()
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
        out = probe.output.float()
        reference = out[:, :1] if has_cls else out.mean(dim=1, keepdim=True)
        signals["cls_similarity"] = torch.cosine_similarity(out[:, prefix:], reference, dim=-1)
    if "keys" in needs:
        signals["keys"] = keys[:, prefix:]
    return signals

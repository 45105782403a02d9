"""Signals from inside a ViT vision tower that pre-LLM stages rank patches by.

A `VisionProbe` captures, during the model's own vision forwards, the input of one encoder layer's
attention (after its norm), its key projection's output and that layer's output; `vision_signals` turns
them into per-patch scores from the layer's own keys (and its q projection of the one query it needs),
so any attention backend (eager, sdpa) works.

Signals (each [N, T] for N images of T patch tokens, or [N, T, D] for "keys"):
- "cls_attention": attention of the CLS query to every patch key, head-averaged (softmax over all
  tokens, including CLS, as in the model).
- "cls_similarity": cosine similarity of the CLS and patch hidden states at the layer's output.
- "keys": the layer's patch keys, heads concatenated (VisionZip merges contextual tokens by these).
Towers without a CLS token (SigLIP) use the mean of all tokens as the query / reference vector instead;
`has_cls=False` marks that substitute (reported by the stages that use it). Towers with q / k norms
(InternViT with `use_qk_norm`) get them applied to the query and keys, as in their attention.

Packed towers (Qwen2-VL / Qwen2.5-VL: every image and frame in ONE sequence, fused `qkv`, no CLS, 2-D
rotary, 2 x 2 patch merger) use `packed_vision_signals`: per frame, mean-token query, values summed or
averaged over each LLM token's merge unit, Qwen2.5-VL's window permutation undone (`restore_unit_order`).
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
    """Captures one encoder layer's attention input (after its norm), key projection output (when the
    attention has a separate `k_proj`) and layer output at every vision forward.

    Installed for as long as a method that needs vision signals is applied: `generate` encodes the
    images before the first forward (transformers passes them on as `mm_encoder_outputs`), so the
    capture must already be in place then. Each vision forward overwrites the previous capture.
    """

    def __init__(self, layer: nn.Module):
        self.attn = layer_attention(layer)
        self.attn_input: torch.Tensor | None = None  # [N, S, D]
        self.keys: torch.Tensor | None = None  # [N, S, H*d]: the layer's k_proj output (None: not captured)
        self.output: torch.Tensor | None = None  # [N, S, D]
        #: the last two (attn_input, keys, output) captures, oldest first: `generate` encodes a prompt's images
        #: and then its videos before the first forward, so a mixed prompt leaves one capture per modality
        self.history: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []
        self._handles = [self.attn.register_forward_pre_hook(self._before_attention, with_kwargs=True),
                         layer.register_forward_hook(self._after_layer)]
        if isinstance(getattr(self.attn, "k_proj", None), nn.Module):
            self._handles.append(self.attn.k_proj.register_forward_hook(self._after_key_projection))

    def _before_attention(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.attn_input = (args[0] if args else kwargs["hidden_states"]).detach()
        self.keys = None

    def _after_key_projection(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.keys = output.detach()

    def _after_layer(self, module: nn.Module, args: tuple, output: object) -> None:
        self.output = (output[0] if isinstance(output, tuple) else output).detach()
        self.history = [*self.history, (self.attn_input, self.keys, self.output)][-2:]

    def capture(self, back: int = 0) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(attn_input, keys or None, output) of the `back`-th most recent vision forward (0 = the last one)."""
        if back >= len(self.history):
            raise ValueError("vision signals are needed but the vision tower has not run while the method was applied "
                             "(pass pixel values, not precomputed features, to the model)")
        return self.history[-1 - back]

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


def _qk_norm(norm: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    """A tower's q / k norm (InternViT's `use_qk_norm`: over all heads; per-head norms: over head_dim) applied
    to projections [N, S, H*d]; identity when the attention has none."""
    if norm is None:
        return x
    width = getattr(getattr(norm, "weight", None), "shape", (x.shape[-1],))[-1]
    return norm(x) if width == x.shape[-1] else norm(x.unflatten(-1, (-1, width))).flatten(-2)


@torch.no_grad()
def vision_signals(probe: VisionProbe, needs: frozenset[str], has_cls: bool, prefix: int, back: int = 0) -> dict[str, torch.Tensor]:
    """Compute the requested signals for the patch tokens `prefix:` of every image of a capture (`back`: see
    `VisionProbe.capture`; 0 = the last vision forward).

    prefix: tokens before the patches that the projector drops (1 for the CLS that LLaVA's "default"
    strategy removes). The attention module must have q_proj, k_proj, head_dim and scale/scaling.
    """
    unknown = needs - SIGNALS
    if unknown:
        raise ValueError(f"unknown vision signals {sorted(unknown)}; known: {sorted(SIGNALS)}")
    attn_input, keys, output = probe.capture(back)
    attn, hidden = probe.attn, attn_input.float()
    signals: dict[str, torch.Tensor] = {}
    weight = {name: p.float() for name, p in attn.named_parameters()}
    if keys is None:
        keys = nn.functional.linear(hidden, weight["k_proj.weight"], weight.get("k_proj.bias"))  # [N, S, H*d]
    keys = _qk_norm(getattr(attn, "k_norm", None), keys.float())
    if "cls_attention" in needs:
        reference = hidden[:, :1] if has_cls else hidden.mean(dim=1, keepdim=True)
        query = nn.functional.linear(reference, weight["q_proj.weight"], weight.get("q_proj.bias"))
        query = _heads(attn, _qk_norm(getattr(attn, "q_norm", None), query))
        scale = getattr(attn, "scale", None) or attn.scaling
        # one [1, d] x [d, S] product per head on the keys' own [N, S, H, d] layout: the 4-D matmul against
        # the transposed [N, H, d, S] view first copies all keys into that layout (~7x slower on CPU)
        keys_by_head = keys.unflatten(-1, (-1, attn.head_dim))  # [N, S, H, d]
        logits = torch.stack([torch.bmm(query[:, h], keys_by_head[:, :, h].transpose(1, 2))
                              for h in range(query.shape[1])], dim=1)  # [N, H, 1, S]
        probs = torch.softmax(logits * scale, dim=-1)
        signals["cls_attention"] = probs.mean(dim=1)[:, 0, prefix:]
    if "cls_similarity" in needs:
        out = output.float()
        reference = out[:, :1] if has_cls else out.mean(dim=1, keepdim=True)
        signals["cls_similarity"] = torch.cosine_similarity(out[:, prefix:], reference, dim=-1)
    if "keys" in needs:
        signals["keys"] = keys[:, prefix:]
    return signals


def restore_unit_order(values: torch.Tensor, merge_unit: int, order: torch.Tensor) -> torch.Tensor:
    """[S, D] in a tower's permuted merge-unit order (slot i holds unit order[i]) -> original order."""
    restore = torch.argsort(order.to(values.device))
    return values.view(-1, merge_unit, values.shape[-1])[restore].reshape(values.shape)


@torch.no_grad()
def packed_vision_signals(probe: VisionProbe, needs: frozenset[str], frame_patches: list[int], merge_unit: int,
                          order: torch.Tensor | None = None, back: int = 0) -> dict[str, list[torch.Tensor]]:
    """Signals for towers that run all images/frames as ONE packed sequence with a fused `qkv` projection and
    no CLS token (Qwen2-VL / Qwen2.5-VL `blocks`), per LLM token, one tensor per frame.

    The capture is [S, D] (S = sum(frame_patches) patches, no batch dimension). frame_patches: patches of
    every frame in sequence order; merge_unit: consecutive patches that the merger turns into one LLM token
    (spatial_merge_size ** 2); order [S // merge_unit]: the merge units' original index at each sequence
    slot when the tower permutes them (Qwen2.5-VL window attention), None otherwise.

    Substitutes (deviation, no CLS): "cls_attention" is the attention of the frame's mean-pooled token as
    the query to the frame's patch keys, head-averaged, softmax over the frame, WITHOUT the tower's 2-D
    rotary embedding (a mean token has no position) and regardless of the tower's window layout;
    "cls_similarity" is the cosine of each patch output with the frame's mean output. A token's value is
    the sum (attention) or mean (similarity, keys) over its merge unit's patches.
    -> name -> list over frames of [T_f] ("keys": [T_f, D]) with T_f = frame_patches[f] // merge_unit.
    """
    unknown = needs - SIGNALS
    if unknown:
        raise ValueError(f"unknown vision signals {sorted(unknown)}; known: {sorted(SIGNALS)}")
    attn_input, _, output = probe.capture(back)
    attn = probe.attn
    hidden, out = attn_input.float(), output.float()
    if order is not None:
        hidden, out = (restore_unit_order(t, merge_unit, order) for t in (hidden, out))
    dim = hidden.shape[-1]
    weight, bias = attn.qkv.weight.float(), attn.qkv.bias
    bias = bias.float() if bias is not None else torch.zeros(3 * dim, device=hidden.device)
    keys = nn.functional.linear(hidden, weight[dim:2 * dim], bias[dim:2 * dim])  # [S, D]
    heads, head_dim = attn.num_heads, dim // attn.num_heads
    scale = getattr(attn, "scaling", None) or head_dim ** -0.5
    signals: dict[str, list[torch.Tensor]] = {name: [] for name in needs}
    start = 0
    for patches in frame_patches:
        frame = slice(start, start + patches)
        start += patches
        tokens = patches // merge_unit
        if "cls_attention" in needs:
            query = nn.functional.linear(hidden[frame].mean(dim=0), weight[:dim], bias[:dim]).view(heads, head_dim)
            logits = torch.einsum("hd,shd->hs", query, keys[frame].view(patches, heads, head_dim)) * scale
            probs = torch.softmax(logits, dim=-1).mean(dim=0)  # [patches]
            signals["cls_attention"].append(probs.view(tokens, merge_unit).sum(dim=1))
        if "cls_similarity" in needs:
            sim = torch.cosine_similarity(out[frame], out[frame].mean(dim=0, keepdim=True), dim=-1)
            signals["cls_similarity"].append(sim.view(tokens, merge_unit).mean(dim=1))
        if "keys" in needs:
            signals["keys"].append(keys[frame].view(tokens, merge_unit, dim).mean(dim=1))
    return signals

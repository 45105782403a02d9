"""Analytic prefill FLOPs of a multimodal LLM, with and without a token-reduction method.

Everything here is arithmetic on config numbers: no model is loaded and nothing is downloaded.
All counts are FLOPs (a multiply-add = 2 FLOPs); reports are in TFLOPs (1e12). Batch size 1.

LLM (SPEC 1c, the AIM paper's accounting, which follows LLM-Viewer). A decoder layer computing on n
tokens with hidden d, kv width d_kv, MLP width m and H heads costs

    2n(2d^2 + 2 d d_kv + 3 d m) + 4 n^2 d + 5 H n^2 + 18 n d

(q/o and k/v projections, gated MLP, QK^T and AV over the full n x n square, softmax 5 FLOPs per score,
two norms + two residual adds + the MLP activation). The query width is taken to be d (true for the
Llama / Qwen2 families; models whose heads * head_dim != d are approximated). Prefill total = sum over
layers with each layer's own n, plus the LM head.

Conventions that reproduce the published figures (checked in tests/test_flops.py):
- LM head: once, for the last token only (the one whose logits generation needs): 2 d V. LLM-Viewer,
  which the AIM paper used, adds d V; either way it is < 0.001 TFLOPs here. Counting the head for every
  prefill token instead would give 106.57 rather than 99.63 TFLOPs for LLaVA-OneVision-7B, so the
  paper did not.
- Text tokens: exactly 100 for LLaVA-OneVision video (32 x 196 visual) and exactly 40 for LLaVA-1.5
  (576 visual); these are the numbers in the AIM repo's FLOPs scripts. They stand for every non-visual
  token (system prompt, chat template, question; the one video newline token LLaVA-OneVision appends
  is inside them).
    LLaVA-OneVision-7B, 32 frames: 99.628 TFLOPs (paper 99.63)
    merge-only 25%:                22.900          (paper 22.90)
    LLaVA-1.5-7B, 576 + 40:         8.181          (paper 8.18)
- In-LLM pruning schedule. leanvlm (and the AIM implementation itself) drops tokens AFTER layer l using
  layer l's attention, so layer l computes on text + round(V * keep(l - 1)) tokens (keep(-1) = 1): layers
  0..l1 see all V visual tokens, layer l1 + 1 sees keep(l1), layers >= l2 none ("runtime" accounting,
  the default). The AIM paper's FLOPs script (LLM-Viewer/analyze_flex_prefill_only.py in the AIM repo)
  instead charges layer l with keep(l), i.e. one layer earlier than its own code prunes. Only that
  "paper" accounting reproduces the published AIM figure:
    AIM default, paper accounting:   14.757 TFLOPs (paper 14.76, 6.75x)
    AIM default, runtime accounting: 15.528 TFLOPs (6.42x) <- what leanvlm actually executes
- Rounding: a kept count is round(fraction * count) with Python's round (half to even, the same as
  `torch.round` in `methods.base.keep_count`), at least 1 when the fraction is > 0 and tokens exist, 0
  when the fraction is 0. The paper's script truncates (int()); for its settings every product is an
  integer, so the two agree. Merging uses `ops.merge.merge_schedule` (final count max(1, round(keep T))).

Vision encoder (reported separately; the published figures are LLM-only). One encoder pass on N tokens
(patches + CLS if the model has one) costs, per layer, the SPEC 1c formula with d_kv = D and a 2-matrix
MLP (3 matrices for gated MLPs such as Qwen2.5-VL's):

    2N(4D^2 + k D D_mlp) + 4 N S D + 5 H N S + 18 N D,   k = 2 or 3,

where S = N for global attention and S = min(N, window) for windowed layers (Qwen2.5-VL). Plus the
patch embedding 2 * patches * patch_dim * D and the projector chain 2 * tokens * w_i * w_{i+1} on the
tokens it runs on. Every configured layer is counted even when the model reads a lower layer's features
(LLaVA's vision_feature_layer=-2), because transformers runs them all.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from leanvlm.ops.merge import merge_schedule
from leanvlm.ops.schedule import Modality, default_merge_keep, progressive_keep, prune_window

TERA = 1e12

Accounting = Literal["runtime", "paper"]
ImportanceKind = Literal["pagerank", "text", "last_token"]

_MISSING = object()


# ----------------------------------------------------------------------------------------------- shapes
def _get(cfg: Any, *names: str, default: Any = _MISSING) -> Any:
    """First of `names` present (and not None) on a config object or mapping."""
    for name in names:
        value = cfg.get(name) if isinstance(cfg, Mapping) else getattr(cfg, name, None)
        if value is not None:
            return value
    if default is _MISSING:
        raise KeyError(f"config has none of the fields {names}")
    return default


def _as_config(config: Any) -> Any:
    """A config.json dict becomes the transformers config class of its model_type, so that fields left
    out of the file get the class defaults exactly as `from_pretrained` would (Qwen2-VL-7B's real
    config.json, for one, lists only 3 vision fields). Objects and unknown model types pass through."""
    if not isinstance(config, Mapping) or "model_type" not in config:
        return config
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(**config)
    except (KeyError, ValueError):
        return config


def _text_config(config: Any) -> Any:
    if isinstance(config, Mapping):
        return config.get("text_config") or config
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


@dataclass(frozen=True)
class LLMShape:
    """Decoder dimensions used by SPEC 1c: hidden d, kv_dim = kv heads * head_dim, MLP width m, heads H."""

    hidden: int
    kv_dim: int
    intermediate: int
    heads: int
    layers: int
    vocab: int

    @classmethod
    def from_config(cls, config: Any) -> LLMShape:
        """Read the text config of a VLM config (LlavaConfig, LlavaOnevisionConfig, Qwen2VLConfig, ...) or a
        plain decoder config; config objects or config.json dicts (nested or flat)."""
        text = _text_config(_as_config(config))
        hidden = int(_get(text, "hidden_size", "n_embd", "d_model"))
        heads = int(_get(text, "num_attention_heads", "n_head"))
        kv_heads = int(_get(text, "num_key_value_heads", default=heads))
        head_dim = int(_get(text, "head_dim", default=hidden // heads))
        return cls(
            hidden=hidden,
            kv_dim=kv_heads * head_dim,
            intermediate=int(_get(text, "intermediate_size", "n_inner", default=4 * hidden)),
            heads=heads,
            layers=int(_get(text, "num_hidden_layers", "n_layer")),
            vocab=int(_get(text, "vocab_size")),
        )


@dataclass(frozen=True)
class VisionShape:
    """One vision-encoder pass (one image, crop, or Qwen2-VL temporal patch of frames).

    patches: patch tokens per pass; cls_tokens: extra class tokens (1 for CLIP, 0 for SigLIP / Qwen).
    patch_dim: input values per patch (channels * patch^2 * temporal patch). window_tokens: tokens per
    attention window in windowed layers (0 = all layers global); full_attention_layers: the global layers
    when windowed. projector: widths of the linear chain from encoder to LLM, run on projector_tokens
    tokens (e.g. (1024, 4096, 4096) on 576 for LLaVA-1.5; Qwen's patch merger on patches / 4; Idefics3 /
    SmolVLM's one linear after the pixel shuffle, (D * s^2, LLM width) on patches / s^2).
    projector_copies: how many such chains run on the same tokens (Qwen3-VL: the merger + one DeepStack
    merger per `deepstack_visual_indexes` level).
    """

    hidden: int
    intermediate: int
    heads: int
    layers: int
    patches: int
    cls_tokens: int = 0
    patch_dim: int = 3 * 14 * 14
    gated_mlp: bool = False
    window_tokens: int = 0
    full_attention_layers: tuple[int, ...] = ()
    projector: tuple[int, ...] = ()
    projector_tokens: int = 0
    projector_copies: int = 1

    @property
    def tokens(self) -> int:
        """Sequence length inside the encoder."""
        return self.patches + self.cls_tokens

    @classmethod
    def from_config(cls, config: Any, image_size: int | None = None) -> VisionShape:
        """Read `vision_config` of a VLM config (object or dict), plus the projector from the top level.

        CLIP / SigLIP style (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
        image_size, patch_size): image_size overrides the config's. Qwen2-VL (embed_dim, depth, num_heads,
        mlp_ratio; merger to hidden_size) and Qwen2.5-VL (hidden_size, intermediate_size, depth, gated MLP,
        windowed attention; merger to out_hidden_size) have dynamic resolution: image_size (a multiple of
        patch_size * spatial_merge_size) defaults to 448. Raises ValueError without a vision_config.
        """
        config = _as_config(config)
        vision = _get(config, "vision_config", default=None)
        if vision is None:
            raise ValueError("config has no vision_config")
        if _get(vision, "depth", default=None) is not None:
            return cls._from_qwen(vision, image_size or 448)
        return cls._from_vit(config, vision, image_size)

    @classmethod
    def _from_vit(cls, config: Any, vision: Any, image_size: int | None) -> VisionShape:
        hidden = int(_get(vision, "hidden_size"))
        # InternViT writes square sizes as [h, w]
        patch, size = (_get(vision, name) for name in ("patch_size", "image_size"))
        patch = int(patch[0] if isinstance(patch, Sequence) else patch)
        side = int(image_size or (size[0] if isinstance(size, Sequence) else size)) // patch
        model_type = str(_get(vision, "model_type", default=""))
        cls_tokens = 1 if ("clip" in model_type and "siglip" not in model_type) or "dinov2" in model_type else 0
        feature_layer = _get(config, "vision_feature_layer", default=-1)
        projector_in = hidden * (len(feature_layer) if isinstance(feature_layer, Sequence) else 1)
        llm_hidden = LLMShape.from_config(config).hidden
        scale = _get(config, "scale_factor", default=None)
        if scale is not None:  # Idefics3 / SmolVLM: pixel shuffle s x s patches into one token, one linear
            scale = int(scale)
            return cls(hidden=hidden, intermediate=int(_get(vision, "intermediate_size")),
                       heads=int(_get(vision, "num_attention_heads")), layers=int(_get(vision, "num_hidden_layers")),
                       patches=side * side, patch_dim=int(_get(vision, "num_channels", default=3)) * patch * patch,
                       projector=(hidden * scale * scale, llm_hidden), projector_tokens=side * side // (scale * scale))
        # "default" drops the CLS token before the projector, "full" keeps it.
        strategy = _get(config, "vision_feature_select_strategy", default="default")
        # DINOv2 configs give the MLP width as mlp_ratio x hidden instead of intermediate_size
        intermediate = _get(vision, "intermediate_size", default=None) or hidden * float(_get(vision, "mlp_ratio", default=4))
        return cls(
            hidden=hidden,
            intermediate=int(intermediate),
            heads=int(_get(vision, "num_attention_heads")),
            layers=int(_get(vision, "num_hidden_layers")),
            patches=side * side,
            cls_tokens=cls_tokens,
            patch_dim=int(_get(vision, "num_channels", default=3)) * patch * patch,
            projector=(projector_in, llm_hidden, llm_hidden),
            projector_tokens=side * side + (cls_tokens if strategy == "full" else 0),
        )

    @classmethod
    def _from_qwen(cls, vision: Any, image_size: int) -> VisionShape:
        patch = int(_get(vision, "patch_size", "spatial_patch_size"))
        merge = int(_get(vision, "spatial_merge_size", default=2))
        if image_size % (patch * merge):
            raise ValueError(f"image_size must be a multiple of {patch * merge} for this model, got {image_size}")
        patches = (image_size // patch) ** 2
        channels = int(_get(vision, "in_channels", "in_chans", default=3))
        patch_dim = channels * int(_get(vision, "temporal_patch_size", default=2)) * patch * patch
        qwen2_vl = _get(vision, "embed_dim", default=None) is not None
        deepstack = _get(vision, "deepstack_visual_indexes", default=None)
        copies = 1
        if deepstack is not None:  # Qwen3-VL: plain GELU MLP, global attention, one merger per DeepStack level
            hidden = int(_get(vision, "hidden_size"))
            intermediate = int(_get(vision, "intermediate_size"))
            gated, out = False, int(_get(vision, "out_hidden_size"))
            window, full = 0, ()
            copies = 1 + len(deepstack)
        elif qwen2_vl:  # Qwen2-VL: hidden_size is the LLM width the merger projects to
            hidden = int(_get(vision, "embed_dim"))
            intermediate = int(hidden * float(_get(vision, "mlp_ratio", default=4)))
            gated, out = False, int(_get(vision, "hidden_size"))
            window, full = 0, ()
        else:  # Qwen2.5-VL: SwiGLU MLP, windowed attention except in fullatt_block_indexes
            hidden = int(_get(vision, "hidden_size"))
            intermediate = int(_get(vision, "intermediate_size"))
            gated, out = True, int(_get(vision, "out_hidden_size"))
            window = (int(_get(vision, "window_size", default=112)) // patch) ** 2
            full = tuple(int(i) for i in _get(vision, "fullatt_block_indexes", default=()))
        merged = hidden * merge * merge
        return cls(
            hidden=hidden,
            intermediate=intermediate,
            heads=int(_get(vision, "num_heads")),
            layers=int(_get(vision, "depth")),
            patches=patches,
            patch_dim=patch_dim,
            gated_mlp=gated,
            window_tokens=window,
            full_attention_layers=full,
            projector=(merged, merged, out),
            projector_tokens=patches // (merge * merge),
            projector_copies=copies,
        )


def shape_from_config(config: Any, image_size: int | None = None) -> tuple[LLMShape, VisionShape | None]:
    """(LLM shape, vision shape or None for a plain LLM config) of any HF config object or config.json dict."""
    config = _as_config(config)
    has_vision = _get(config, "vision_config", default=None) is not None
    return LLMShape.from_config(config), VisionShape.from_config(config, image_size) if has_vision else None


# ----------------------------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class Preset:
    """A model as the calculator needs it.

    image_tokens: visual tokens one encoder pass puts into the LLM for an image (one crop).
    frame_tokens: visual tokens per video frame group after the model's own pooling (None: no video);
    frames_per_group: video frames per encoder pass (2 for Qwen2-VL's temporal patches, else 1).
    *_text_tokens: typical non-visual tokens of a prompt (chat template + question).
    """

    name: str
    llm: LLMShape
    vision: VisionShape | None
    image_tokens: int
    frame_tokens: int | None = None
    frames_per_group: int = 1
    default_frames: int | None = None
    image_text_tokens: int = 100
    video_text_tokens: int = 100
    note: str = ""


def preset_from_config(config: Any, image_size: int | None = None, name: str | None = None) -> Preset:
    """A Preset from any HF config (object or config.json dict), with the family's own token counts:
    LLaVA-1.5 drops CLS (576 per 336 px image); LLaVA-OneVision pools video frames 2x2 bilinear
    (ceil: 27x27 -> 14x14 = 196); LLaVA-NeXT-Video average-pools by spatial_pool_stride (floor: 24x24
    -> 12x12 = 144); Qwen2-VL / 2.5-VL merge 2x2 patches and encode 2 frames per pass. A plain LLM config
    gives image_tokens = 0: pass visual_tokens_per_frame to `flops`."""
    config = _as_config(config)
    llm, vision = shape_from_config(config, image_size)
    model_type = str(_get(config, "model_type", default="custom"))
    name = name or model_type
    if vision is None:
        return Preset(name=name, llm=llm, vision=None, image_tokens=0)
    if _get(_get(config, "vision_config"), "depth", default=None) is not None:  # Qwen2-VL / Qwen2.5-VL
        group = int(_get(_get(config, "vision_config"), "temporal_patch_size", default=2))
        return Preset(name=name, llm=llm, vision=vision, image_tokens=vision.projector_tokens,
                      frame_tokens=vision.projector_tokens, frames_per_group=group, default_frames=32)
    if model_type == "gemma3":  # the projector average-pools the patch grid, then one matrix to the LLM width
        tokens = int(_get(config, "mm_tokens_per_image", default=256))
        vision = replace(vision, projector=(vision.hidden, llm.hidden), projector_tokens=tokens)
        return Preset(name=name, llm=llm, vision=vision, image_tokens=tokens)
    if model_type == "internvl":  # InternViT has a CLS token; pixel shuffle folds 1 / ratio^2 patches a token
        fold = round(1 / float(_get(config, "downsample_ratio", default=0.5))) ** 2
        vision = replace(vision, cls_tokens=1, projector=(vision.hidden * fold, llm.hidden, llm.hidden),
                         projector_tokens=vision.patches // fold)
        return Preset(name=name, llm=llm, vision=vision, image_tokens=vision.projector_tokens)
    side = math.isqrt(vision.patches)
    if model_type == "llava_onevision":
        frame = math.ceil(side / 2) ** 2
    elif model_type == "llava_next_video":
        frame = (side // int(_get(config, "spatial_pool_stride", default=2))) ** 2
    else:
        frame = None
    return Preset(name=name, llm=llm, vision=vision, image_tokens=vision.projector_tokens, frame_tokens=frame,
                  default_frames=32 if frame else None)


_QWEN2_7B = LLMShape(hidden=3584, kv_dim=512, intermediate=18944, heads=28, layers=28, vocab=152064)
_SIGLIP_SO400M_384 = dict(hidden=1152, intermediate=4304, heads=16, layers=26, patches=729, patch_dim=588,
                          projector_tokens=729)
_QWEN_VL_448 = dict(heads=16, layers=32, patches=1024, patch_dim=3 * 2 * 14 * 14, projector_tokens=256)

_VICUNA_7B = LLMShape(hidden=4096, kv_dim=4096, intermediate=11008, heads=32, layers=32, vocab=32064)
_CLIP_L_336 = dict(hidden=1024, intermediate=4096, heads=16, layers=24, patches=576, cls_tokens=1, patch_dim=588)

#: Real configs as numbers (public config.json files of the llava-hf / Qwen checkpoints).
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="llava-1.5-7b",
            llm=LLMShape(hidden=4096, kv_dim=4096, intermediate=11008, heads=32, layers=32, vocab=32064),
            vision=VisionShape(hidden=1024, intermediate=4096, heads=16, layers=24, patches=576, cls_tokens=1,
                               patch_dim=588, projector=(1024, 4096, 4096), projector_tokens=576),
            image_tokens=576,
            image_text_tokens=40,
            note="CLIP ViT-L/14-336 + Vicuna-7B; CLS dropped before the projector",
        ),
        Preset(
            name="llava-onevision-0.5b",
            llm=LLMShape(hidden=896, kv_dim=128, intermediate=4864, heads=14, layers=24, vocab=151936),
            vision=VisionShape(**_SIGLIP_SO400M_384, projector=(1152, 896, 896)),
            image_tokens=729, frame_tokens=196, default_frames=32,
            note="SigLIP-so400m-384 (26 layers as in the HF config) + Qwen2-0.5B; image = one 384 px crop",
        ),
        Preset(
            name="llava-onevision-7b",
            llm=_QWEN2_7B,
            vision=VisionShape(**_SIGLIP_SO400M_384, projector=(1152, 3584, 3584)),
            image_tokens=729, frame_tokens=196, default_frames=32,
            note="SigLIP-so400m-384 + Qwen2-7B; image = one 384 px crop (anyres adds crops: images=)",
        ),
        Preset(
            name="llava-video-7b",
            llm=_QWEN2_7B,
            vision=VisionShape(**_SIGLIP_SO400M_384, projector=(1152, 3584, 3584)),
            image_tokens=729, frame_tokens=196, default_frames=64,
            note="LLaVA-Video-7B-Qwen2 as run by transformers' LlavaOnevision classes (bilinear 2x2 pool, "
                 "196 per frame); the original LLaVA-NeXT code's pooling mode may differ",
        ),
        Preset(
            name="llava-next-7b",
            llm=_VICUNA_7B,
            vision=VisionShape(**_CLIP_L_336, projector=(1024, 4096, 4096), projector_tokens=576),
            image_tokens=576,
            image_text_tokens=40,
            note="llava-v1.6-vicuna-7b: CLIP ViT-L/14-336 + Vicuna-7B; one pass = one 336 px crop (576 tokens); "
                 "anyres runs the base + up to 4 tiles (images=5 for a 672x672 image: 5 x 576 tokens, plus "
                 "the unpadded grid's newline tokens, 48 at 672x672)",
        ),
        Preset(
            name="internvl3-8b",
            llm=LLMShape(hidden=3584, kv_dim=512, intermediate=18944, heads=28, layers=28, vocab=151674),
            vision=VisionShape(hidden=1024, intermediate=4096, heads=16, layers=24, patches=1024, cls_tokens=1,
                               patch_dim=588, projector=(4096, 3584, 3584), projector_tokens=256),
            image_tokens=256,
            note="InternViT-300M-448px-V2.5 + Qwen2.5-7B; one pass = one 448 px tile (1024 patches pixel-shuffled "
                 "to 256 tokens); an image is up to 12 tiles + a thumbnail (images=)",
        ),
        Preset(
            name="gemma-3-4b",
            llm=LLMShape(hidden=2560, kv_dim=1024, intermediate=10240, heads=8, layers=34, vocab=262208),
            vision=VisionShape(hidden=1152, intermediate=4304, heads=16, layers=27, patches=4096, patch_dim=588,
                               projector=(1152, 2560), projector_tokens=256),
            image_tokens=256,
            note="SigLIP-so400m-896 + Gemma 3 4B (8 heads x 256: q/o are 2560 x 2048, counted as d x d by SPEC "
                 "1c's formula; 5 of every 6 layers attend within 1024 tokens, counted as global); one pass = one "
                 "896 px image or pan-and-scan crop (4096 patches pooled to 256 tokens)",
        ),
        Preset(
            name="qwen2-vl-7b",
            llm=_QWEN2_7B,
            vision=VisionShape(hidden=1280, intermediate=5120, **_QWEN_VL_448, projector=(5120, 5120, 3584)),
            image_tokens=256, frame_tokens=256, frames_per_group=2, default_frames=32,
            note="dynamic resolution; preset at 448x448 (1024 patches -> 256 tokens per image / per 2 frames)",
        ),
        Preset(
            name="qwen2.5-vl-7b",
            llm=_QWEN2_7B,
            vision=VisionShape(hidden=1280, intermediate=3420, **_QWEN_VL_448, gated_mlp=True, window_tokens=64,
                               full_attention_layers=(7, 15, 23, 31), projector=(5120, 5120, 3584)),
            image_tokens=256, frame_tokens=256, frames_per_group=2, default_frames=32,
            note="dynamic resolution; preset at 448x448; 112 px attention windows except 4 global layers",
        ),
        # vision config and the LLM's width / layers / heads checked against public copies of the config; its
        # MLP width and vocabulary are from the Qwen3-8B family, not checked against a published file
        Preset(
            name="qwen3-vl-8b",
            llm=LLMShape(hidden=4096, kv_dim=8 * 128, intermediate=12288, heads=32, layers=36, vocab=151936),
            vision=VisionShape(hidden=1152, intermediate=4304, heads=16, layers=27, patches=1024,
                               patch_dim=3 * 2 * 16 * 16, projector=(4608, 4608, 4096), projector_tokens=256,
                               projector_copies=4),
            image_tokens=256, frame_tokens=256, frames_per_group=2, default_frames=32,
            note="Qwen3-VL-8B-Instruct; dynamic resolution, preset at 512x512 (patch 16: 1024 patches -> 256 "
                 "tokens per image / per 2 frames); merger + 3 DeepStack mergers (their additions into LLM "
                 "layers 0-2 are not matmuls and not counted)",
        ),
        # not checked against a published config file (none was reachable here): standard SigLIP-so400m and
        # SmolLM2-1.7B numbers
        Preset(
            name="smolvlm-2.2b",
            llm=LLMShape(hidden=2048, kv_dim=2048, intermediate=8192, heads=32, layers=24, vocab=49280),
            vision=VisionShape(hidden=1152, intermediate=4304, heads=16, layers=27, patches=729, patch_dim=588,
                               projector=(1152 * 9, 2048), projector_tokens=81),
            image_tokens=81, frame_tokens=81, default_frames=32,
            note="SmolVLM2-2.2B-Instruct: SigLIP-so400m/14 at 384 px + SmolLM2-1.7B; pixel shuffle 3 x 3 -> 81 "
                 "tokens per 384 px tile; an image is up to 4 x 4 tiles + 1 global tile (images=17), a video "
                 "frame one tile",
        ),
    )
}


# ----------------------------------------------------------------------------------------------- FLOPs
def layer_flops(n_tokens: int, shape: LLMShape, causal: bool = False) -> float:
    """FLOPs of one decoder layer computing on n_tokens tokens (SPEC 1c exactly). causal=True charges the
    attention terms (4 n^2 d + 5 H n^2) for the n (n + 1) / 2 query-key pairs a causal kernel computes
    instead of the n^2 the SPEC (and the papers) count: what SDPA's unmasked causal path executes."""
    n, d = float(n_tokens), float(shape.hidden)
    linear = 2 * n * (2 * d * d + 2 * d * shape.kv_dim + 3 * d * shape.intermediate)
    pairs = n * (n + 1) / 2 if causal else n * n
    return linear + 4 * pairs * d + 5 * shape.heads * pairs + 18 * n * d


def lm_head_flops(shape: LLMShape, tokens: int = 1) -> float:
    """LM head FLOPs: 2 d V per token whose logits are computed (prefill: the last one)."""
    return 2.0 * shape.hidden * shape.vocab * tokens


def llm_prefill_flops(tokens_per_layer: Sequence[int], shape: LLMShape, lm_head_tokens: int = 1,
                      causal: bool = False) -> float:
    """Prefill FLOPs: sum of `layer_flops` over the layers (one count per layer, len == shape.layers)
    plus the LM head for `lm_head_tokens` tokens (1: the convention that reproduces the papers).
    causal: count only the causal half of the attention scores (`layer_flops`)."""
    if len(tokens_per_layer) != shape.layers:
        raise ValueError(f"need one token count per layer ({shape.layers}), got {len(tokens_per_layer)}")
    return sum(layer_flops(n, shape, causal) for n in tokens_per_layer) + lm_head_flops(shape, lm_head_tokens)


def _vision_layer_flops(layer: int, shape: VisionShape) -> float:
    n, d = float(shape.tokens), float(shape.hidden)
    windowed = shape.window_tokens and layer not in shape.full_attention_layers
    span = min(n, shape.window_tokens) if windowed else n
    mlp_matrices = 3 if shape.gated_mlp else 2
    linear = 2 * n * (4 * d * d + mlp_matrices * d * shape.intermediate)
    return linear + 4 * n * span * d + 5 * shape.heads * n * span + 18 * n * d


def vision_flops(num_images: int, shape: VisionShape) -> float:
    """Vision-encoder + projector FLOPs for `num_images` encoder passes (images, crops, frames or Qwen
    temporal patches). Accounting in the module docstring."""
    per_pass = 2.0 * shape.patches * shape.patch_dim * shape.hidden
    per_pass += sum(_vision_layer_flops(layer, shape) for layer in range(shape.layers))
    per_pass += shape.projector_copies * sum(2.0 * shape.projector_tokens * a * b
                                             for a, b in zip(shape.projector, shape.projector[1:]))
    return num_images * per_pass


def merge_flops(tokens: int, channels: int, passes: Sequence[int]) -> float:
    """Bipartite-merging FLOPs for ONE frame of `tokens` tokens with a `channels`-wide metric, removing
    passes[i] tokens in pass i (as `ops.merge.merge_schedule` returns). Per pass on T tokens, A = ceil(T/2)
    sources, B = floor(T/2) destinations: L2 normalisation 3TC, cosine matmul 2ABC, row max/argmax AB,
    averaging (r + B)C. Multiply by the number of frames: merging never crosses frames (SPEC 1a).
    (The AIM repo's overhead script merges all frames as one set, which is ~frames times larger.)"""
    total, current = 0.0, tokens
    for r in passes:
        sources, destinations = (current + 1) // 2, current // 2
        total += 3.0 * current * channels + 2.0 * sources * destinations * channels
        total += sources * destinations + (r + destinations) * channels
        current -= r
    return total


def importance_flops(
    n_tokens: int,
    shape: LLMShape,
    kind: ImportanceKind = "pagerank",
    iterations: int = 5,
    n_queries: int | None = None,
) -> float:
    """FLOPs to score the n_tokens tokens of one pruning layer (SPEC 1b; FastV).

    Scores are recomputed from the layer's q/k (the attention kernel never materialises probabilities):
    q and k projections for the query rows and all keys, RoPE (3 FLOPs per element), QK^T, scaling +
    mask (2 per score), softmax (5 per score), then
      pagerank:   `iterations` vector-matrix products per head (2 H n^2 each) + RMS over heads;
      text:       sum of the n_queries question rows over queries and heads (H q n);
      last_token: the same with one query row (FastV).
    Counting the projections makes this an upper bound for implementations that reuse the layer's own.
    """
    n, d = float(n_tokens), float(shape.hidden)
    if kind == "pagerank":
        q = n
    elif kind == "text":
        if n_queries is None:
            raise ValueError("kind='text' needs n_queries (the question tokens)")
        q = float(min(n_queries, n_tokens))
    elif kind == "last_token":
        q = 1.0
    else:
        raise ValueError(f"unknown importance kind {kind!r}")
    heads = shape.heads
    total = 2 * q * d * d + 2 * n * d * shape.kv_dim + 3 * (q * d + n * shape.kv_dim)
    total += 2 * q * n * d + (2 + 5) * heads * q * n
    if kind == "pagerank":
        total += iterations * 2 * heads * n * n + 2 * heads * n + 2 * n
    else:
        total += heads * q * n
    return total


# ----------------------------------------------------------------------------------------------- token schedules
def kept_count(count: int, fraction: float) -> int:
    """Tokens kept of `count` at `fraction`: round half to even, >= 1 if fraction > 0 and count > 0."""
    if fraction <= 0 or count <= 0:
        return 0
    return min(count, max(1, round(count * fraction)))


def merged_tokens_per_frame(tokens_per_frame: int, merge_keep: float) -> int:
    """Tokens per frame after AIM's merging (`ops.merge.merge_schedule`)."""
    return tokens_per_frame - sum(merge_schedule(tokens_per_frame, merge_keep))


def aim_tokens_per_layer(
    visual_tokens_per_frame: int,
    frames: int,
    text_tokens: int,
    num_layers: int,
    merge_keep: float = 0.25,
    l1: int | None = None,
    l2: int | None = None,
    prune: bool = True,
    accounting: Accounting = "runtime",
) -> list[int]:
    """Tokens each decoder layer computes on under AIM.

    Merging keeps merge_keep of every frame (196 -> 49 at 0.25), so V = frames * merged enter the LLM.
    With prune, pruning follows `ops.schedule.progressive_keep` on V; l1/l2 default to
    `ops.schedule.prune_window(num_layers, "video", l1, l2)` (the SPEC's). accounting="runtime": layer l sees
    text + round(V keep(l-1)) (layers 0..l1 all, layers >= l2 none; what leanvlm executes).
    accounting="paper": layer l sees text + round(V keep(l)) (the AIM paper's FLOPs script; reproduces its
    14.76 TFLOPs).
    """
    if accounting not in ("runtime", "paper"):
        raise ValueError(f"accounting must be 'runtime' or 'paper', got {accounting!r}")
    visual = frames * merged_tokens_per_frame(visual_tokens_per_frame, merge_keep)
    if not prune:
        return [text_tokens + visual] * num_layers
    l1, l2 = prune_window(num_layers, "video", l1, l2)
    shift = 1 if accounting == "runtime" else 0
    return [
        text_tokens + (visual if layer - shift < 0 else kept_count(visual, progressive_keep(layer - shift, l1, l2)))
        for layer in range(num_layers)
    ]


def fastv_tokens_per_layer(
    visual_tokens: int, text_tokens: int, num_layers: int, layer: int = 1, keep: float = 0.5
) -> list[int]:
    """FastV as leanvlm runs it: the stage at 0-indexed `layer` K scores with layer K's attention and drops
    after it, so layers 0..K see all visual tokens and layers > K see round(keep * visual). (FastV's own
    code prunes before layer K with layer K-1's attention: the same list for K-1 here; the default 1 is the
    paper's K=2.)"""
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer must be in [0, {num_layers - 1}], got {layer}")
    kept = kept_count(visual_tokens, keep)
    return [text_tokens + (visual_tokens if idx <= layer else kept) for idx in range(num_layers)]


# ----------------------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Workload:
    """One prefill: `frames` encoder units of `tokens_per_frame` visual tokens each (an image crop, a
    video frame, or a Qwen2-VL temporal patch of 2 frames: the unit AIM merges within) + text tokens.
    kind: "image" or "video" (methods with per-modality defaults, e.g. AIM, plan by it)."""

    llm: LLMShape
    tokens_per_frame: int
    frames: int
    text_tokens: int
    kind: Modality = "image"

    @property
    def visual_tokens(self) -> int:
        return self.tokens_per_frame * self.frames

    def base_tokens_per_layer(self) -> list[int]:
        return [self.text_tokens + self.visual_tokens] * self.llm.layers


@dataclass(frozen=True)
class MethodCost:
    """What a method does to a workload: tokens per decoder layer and its own FLOPs (scoring, merging)."""

    per_layer_tokens: list[int]
    overhead_flops: float = 0.0


def aim_cost(
    w: Workload,
    *,
    merge_keep: float | None = None,
    l1: int | None = None,
    l2: int | None = None,
    prune: bool = True,
    importance: ImportanceKind = "pagerank",
    iterations: int = 5,
    merge_channels: int | None = None,
    accounting: Accounting = "runtime",
) -> MethodCost:
    """AIM (SPEC 1): merging per frame, then progressive pruning. Overhead: merging every frame on a metric
    of merge_channels (default: the projector output, i.e. the LLM hidden size) + one importance scoring
    per pruning layer that actually has to choose (0 < kept < present); the text variant uses all
    text tokens as queries (an upper bound for the question). merge_keep, l1, l2 None: AIM's defaults for
    the workload's modality (`ops.schedule`: video 0.25 and the SPEC's layers, images 0.2 and later layers)."""
    merge_keep = default_merge_keep(w.kind) if merge_keep is None else merge_keep
    l1, l2 = prune_window(w.llm.layers, w.kind, l1, l2)
    args = (w.tokens_per_frame, w.frames, w.text_tokens, w.llm.layers, merge_keep, l1, l2, prune)
    tokens = aim_tokens_per_layer(*args, accounting=accounting)
    schedule = merge_schedule(w.tokens_per_frame, merge_keep)
    overhead = w.frames * merge_flops(w.tokens_per_frame, merge_channels or w.llm.hidden, schedule)
    # Scoring happens on what each layer computes on at run time, whatever the FLOPs accounting.
    runtime = aim_tokens_per_layer(*args, accounting="runtime")
    for layer in range(w.llm.layers - 1):
        present, after = runtime[layer] - w.text_tokens, runtime[layer + 1] - w.text_tokens
        if 0 < after < present:
            overhead += importance_flops(runtime[layer], w.llm, importance, iterations, n_queries=w.text_tokens)
    return MethodCost(tokens, overhead)


def merge_cost(w: Workload, *, merge_keep: float | None = None, merge_channels: int | None = None) -> MethodCost:
    """AIM's merging alone (no in-LLM pruning)."""
    return aim_cost(w, merge_keep=merge_keep, prune=False, merge_channels=merge_channels)


def prune_cost(w: Workload, **options: Any) -> MethodCost:
    """AIM's progressive pruning alone (no merging); options as `aim_cost`."""
    return aim_cost(w, merge_keep=1.0, **options)


def fastv_cost(w: Workload, *, layer: int = 1, keep: float = 0.5) -> MethodCost:
    """FastV: last-token attention at `layer`, keep `keep` of the visual tokens after it."""
    tokens = fastv_tokens_per_layer(w.visual_tokens, w.text_tokens, w.llm.layers, layer, keep)
    return MethodCost(tokens, importance_flops(tokens[layer], w.llm, "last_token"))


def no_method_cost(w: Workload) -> MethodCost:
    """The unreduced model."""
    return MethodCost(w.base_tokens_per_layer())


def stages_cost(method: Any, w: Workload) -> MethodCost:
    """Tokens per layer of a leanvlm `Method` from its stages' analytic plans (`planned_tokens` of the
    pre-LLM stages per frame, then `planned_keep` after each in-LLM stage's layers). Stages do not report
    their own FLOPs, so the overhead is 0 (not counted)."""
    pre, llm = method.stages()
    # per-modality defaults resolved for the workload's kind (duck-typed stages without for_kind plan as they are)
    pre, llm = ([getattr(stage, "for_kind", lambda kind, s=stage: s)(w.kind) for stage in stages]
                for stages in (pre, llm))
    per_frame = w.tokens_per_frame
    for stage in pre:
        per_frame = stage.planned_tokens(per_frame)
    visual_into = visual = per_frame * w.frames
    after: dict[int, list[Any]] = {}
    for stage in llm:
        for layer in stage.layers(w.llm.layers):
            after.setdefault(layer, []).append(stage)
    tokens = []
    for layer in range(w.llm.layers):
        tokens.append(w.text_tokens + visual)
        for stage in after.get(layer, []):
            visual = stage.planned_keep(layer, w.llm.layers, visual_into, visual)
    return MethodCost(tokens)


#: Methods by CLI name: fn(workload, **options) -> MethodCost.
METHODS: dict[str, Callable[..., MethodCost]] = {
    "none": no_method_cost,
    "aim": aim_cost,
    "merge": merge_cost,
    "prune": prune_cost,
    "fastv": fastv_cost,
}


# ----------------------------------------------------------------------------------------------- report
@dataclass
class FlopsReport:
    """Prefill FLOPs of one workload, base vs method. *_tflops in TFLOPs.

    base_tflops / method_tflops: LLM only (decoder layers + LM head), the quantity the papers publish;
    ratio = base / method. vision_tflops: encoder + projector (unchanged by LLM-side methods).
    overhead_tflops: the reduction itself (merging similarity, importance scoring).
    total_*: LLM + vision (+ overhead for the method).
    """

    model: str
    mode: str
    frames: int | None
    images: int | None
    visual_tokens: int
    text_tokens: int
    method: str | None
    base_tflops: float
    method_tflops: float
    ratio: float
    per_layer_tokens: list[int]
    base_per_layer_tokens: list[int]
    base_per_layer_tflops: list[float]
    method_per_layer_tflops: list[float]
    lm_head_tflops: float
    vision_tflops: float
    overhead_tflops: float
    total_base_tflops: float
    total_method_tflops: float
    conventions: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (plain ints, floats, strings, lists)."""
        return dataclasses.asdict(self)


def _resolve_model(model: Any, image_size: int | None) -> Preset:
    if isinstance(model, Preset):
        return model
    if isinstance(model, str) and model in PRESETS:
        return PRESETS[model]
    if isinstance(model, (str, os.PathLike)):
        if not os.path.isfile(model):
            raise ValueError(f"unknown preset {model!r} (presets: {', '.join(PRESETS)}) and no such config file")
        with open(model) as handle:
            return preset_from_config(json.load(handle), image_size, name=os.fspath(model))
    return preset_from_config(model, image_size)


def flops(
    model: str | os.PathLike[str] | Preset | Mapping[str, Any] | Any,
    *,
    frames: int | None = None,
    image: bool = False,
    images: int = 1,
    text_tokens: int | None = None,
    visual_tokens_per_frame: int | None = None,
    image_size: int | None = None,
    method: str | Callable[[Workload], MethodCost] | Any | None = None,
    per_layer_tokens: Sequence[int] | Callable[[Workload], Sequence[int]] | None = None,
    overhead_flops: float = 0.0,
    **method_options: Any,
) -> FlopsReport:
    """Prefill FLOPs of `model` on a video of `frames` frames or (image=True) `images` images / crops.

    model: a PRESETS name, a Preset, an HF config object, a config.json dict, or a path to config.json.
    Neither frames nor image: the preset's default_frames if it does video, else one image.
    text_tokens: non-visual tokens (default: the preset's typical count). visual_tokens_per_frame
    overrides the per-frame (per-image) visual count, e.g. for another resolution or a plain LLM config.
    The method's token counts come from exactly one of:
      method: a METHODS name (options as keyword arguments, e.g. merge_keep=0.25, accounting="paper"),
              a callable (Workload) -> MethodCost, or a leanvlm Method (anything with `stages()`);
      per_layer_tokens: a list (one count per decoder layer) or a callable (Workload) -> list, with
              overhead_flops for its own cost.
    Neither: the report compares the base model with itself.
    """
    preset = _resolve_model(model, image_size)
    if frames is not None and image:
        raise ValueError("give frames or image, not both")
    if frames is None and not image and preset.frame_tokens is not None:
        frames = preset.default_frames
    video = frames is not None
    if (video and frames < 1) or images < 1:
        raise ValueError("frames and images must be >= 1")
    if video and preset.frame_tokens is None and visual_tokens_per_frame is None:
        raise ValueError(f"{preset.name} has no video preset; use image=True or pass visual_tokens_per_frame")
    if video:
        units = math.ceil(frames / preset.frames_per_group)
        per_unit = preset.frame_tokens if visual_tokens_per_frame is None else visual_tokens_per_frame
        text = preset.video_text_tokens if text_tokens is None else text_tokens
    else:
        units = images
        per_unit = preset.image_tokens if visual_tokens_per_frame is None else visual_tokens_per_frame
        text = preset.image_text_tokens if text_tokens is None else text_tokens
    workload = Workload(llm=preset.llm, tokens_per_frame=per_unit, frames=units, text_tokens=text,
                        kind="video" if video else "image")

    method_name, cost = _method_cost(workload, method, per_layer_tokens, overhead_flops, method_options)
    if len(cost.per_layer_tokens) != preset.llm.layers:
        raise ValueError(f"need one token count per layer ({preset.llm.layers}), got {len(cost.per_layer_tokens)}")

    llm = preset.llm
    base_tokens = workload.base_tokens_per_layer()
    base = llm_prefill_flops(base_tokens, llm)
    reduced = llm_prefill_flops(cost.per_layer_tokens, llm)
    vision = vision_flops(units, preset.vision) if preset.vision is not None else 0.0
    return FlopsReport(
        model=preset.name,
        mode="video" if video else "image",
        frames=frames,
        images=None if video else images,
        visual_tokens=workload.visual_tokens,
        text_tokens=text,
        method=method_name,
        base_tflops=base / TERA,
        method_tflops=reduced / TERA,
        ratio=base / reduced,
        per_layer_tokens=[int(n) for n in cost.per_layer_tokens],
        base_per_layer_tokens=base_tokens,
        base_per_layer_tflops=[layer_flops(n, llm) / TERA for n in base_tokens],
        method_per_layer_tflops=[layer_flops(n, llm) / TERA for n in cost.per_layer_tokens],
        lm_head_tflops=lm_head_flops(llm) / TERA,
        vision_tflops=vision / TERA,
        overhead_tflops=cost.overhead_flops / TERA,
        total_base_tflops=(base + vision) / TERA,
        total_method_tflops=(reduced + vision + cost.overhead_flops) / TERA,
        conventions={
            "lm_head_tokens": 1,
            "rounding": "round half to even, >= 1 for a positive fraction",
            "method_options": {k: v for k, v in method_options.items() if isinstance(v, (int, float, str, bool))},
        },
    )


def _method_cost(
    workload: Workload,
    method: Any,
    per_layer_tokens: Any,
    overhead_flops: float,
    options: dict[str, Any],
) -> tuple[str | None, MethodCost]:
    if method is not None and per_layer_tokens is not None:
        raise ValueError("give method or per_layer_tokens, not both")
    if options and (method is None or not isinstance(method, str)):
        raise TypeError(f"method options {sorted(options)} need a method name")
    if per_layer_tokens is not None:
        tokens = per_layer_tokens(workload) if callable(per_layer_tokens) else per_layer_tokens
        return "custom", MethodCost(list(tokens), overhead_flops)
    if method is None:
        return None, no_method_cost(workload)
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
        return method, METHODS[method](workload, **options)
    if hasattr(method, "stages"):
        return type(method).__name__, stages_cost(method, workload)
    return getattr(method, "__name__", type(method).__name__), method(workload)

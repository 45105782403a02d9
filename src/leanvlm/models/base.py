"""The boundary between the runtime and a model family.

An adapter answers, for one model instance: where the LLM's decoder layers are, which token ids are
visual placeholders, how a layer's q/k are formed (RoPE flavour), how positions are gathered, how the
vision tower's features come out per image / frame, and how the LLM input is rebuilt after a pre-LLM
stage changed the token count. Everything family-specific lives in one adapter file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from leanvlm.ops.select import gather_slots
from leanvlm.models.vision import VisionProbe
from leanvlm.runtime.visual import ShrunkSequence, VisualItem, shrink_placeholders


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin with rotate_half (x1, x2) = (-x2, x1), the standard RoPE pairing of HF
    Llama-style models. x [..., d]; cos, sin broadcast to it.

    Bit-identical to that formula ((-a) * b = -(a * b) and u + (-v) = u - v exactly in IEEE arithmetic)
    with one full-size temporary instead of four (the negated half, the rotated copy and two products).
    """
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half] -= x[..., half:] * sin[..., :half]
    out[..., half:] += x[..., :half] * sin[..., half:]
    return out


class ModelAdapter(ABC):
    """Base adapter: Llama/Qwen2-style decoder layers with 1-D RoPE passed as (cos, sin) [B, N, d]."""

    #: class names of the transformers models this adapter supports
    model_classes: ClassVar[tuple[str, ...]] = ()
    #: family name used in the support matrix and error messages
    family: ClassVar[str] = ""
    #: whether every visual item's placeholder run holds exactly its patches, frame by frame in raster order (no
    #: separators), so that `VisualItem.run_offsets` locates each reduced token in it: pre-LLM stages' original
    #: positions and proportional attention apply only then (the runtime leaves both off otherwise)
    run_offsets_supported: ClassVar[bool] = False

    def __init__(self, model: nn.Module):
        self.model = model
        #: the caller's kwargs while the runtime's wrapped `generate` runs (None otherwise): generate
        #: pre-encodes the pixels and drops what its encoder consumed (image sizes, grids) from the forwards
        self.generate_inputs: dict[str, Any] | None = None
        #: set by the runtime while a method whose pre-LLM stages ask for it is applied: reduced visual tokens
        #: keep their original 1-D positions (`feed_features` with run offsets), instead of contiguous ones
        self.original_positions = False

    # --- where things are -------------------------------------------------------------------------
    # transformers 5 VLMs: `XForConditionalGeneration.model` is the multimodal model (vision tower +
    # projector + LLM) and its `language_model` the LLM backbone; families that differ override these.
    @property
    def multimodal_module(self) -> nn.Module:
        """The module whose forward receives input_ids + pixel inputs and calls the LLM (hooked first)."""
        return self.model.model

    @property
    def text_model(self) -> nn.Module:
        """The LLM backbone (embeddings + decoder layers + final norm)."""
        return self.model.model.language_model

    @property
    def layers(self) -> nn.ModuleList:
        return self.text_model.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def text_config(self) -> Any:
        return self.model.config.get_text_config()

    @property
    def visual_token_ids(self) -> list[int]:
        """Token ids that mark visual placeholders in input_ids (the config's image and video token ids)."""
        image = getattr(self.model.config, "image_token_id", None)
        return ([] if image is None else [int(image)]) + self.video_token_ids

    @property
    def video_token_ids(self) -> list[int]:
        """Placeholder ids that mark a video (the config's video token id; [] for image-only models): a sample
        holding one is a video sample for methods with per-modality defaults."""
        video = getattr(self.model.config, "video_token_id", None)
        return [] if video is None else [int(video)]

    @property
    def pad_token_id(self) -> int:
        pad = getattr(self.text_config, "pad_token_id", None)
        return 0 if pad is None else int(pad)

    # --- attention ----------------------------------------------------------------------------------
    def query_key(
        self, attn: nn.Module, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
        rows: torch.Tensor | None, projections: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """A layer's post-RoPE q (for slot index rows [B, R], None = all) and k (all slots).

        hidden [B, N, D] is the attention module's input (after the input norm). projections: the layer's
        own q_proj / k_proj outputs for that input ("q": [B, N, H*d], "k": [B, N, Hkv*d]) when the runtime
        captured them; a missing one is recomputed from hidden.
        -> q [B, H, R, d], k [B, Hkv, N, d], scale.
        """
        projections = projections or {}
        head_dim = attn.head_dim
        cos, sin = (t.expand(hidden.shape[0], *t.shape[1:]) for t in position_embeddings)
        queries = projections.get("q")
        if queries is None:
            queries = attn.q_proj(hidden if rows is None else gather_slots(hidden, rows, fill=None))
        elif rows is not None:
            queries = gather_slots(queries, rows, fill=None)
        q_cos, q_sin = (cos, sin) if rows is None else (gather_slots(t, rows, fill=None) for t in (cos, sin))
        keys = projections.get("k")
        if keys is None:
            keys = attn.k_proj(hidden)
        queries, keys = queries.unflatten(-1, (-1, head_dim)), keys.unflatten(-1, (-1, head_dim))  # [B, N, heads, d]
        if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms come before RoPE
            queries, keys = attn.q_norm(queries), attn.k_norm(keys)
        # RoPE in the projections' own [B, N, heads, d] layout (contiguous, so the elementwise passes run
        # at full speed), then [B, heads, N, d] as a view
        queries = apply_rope(queries, q_cos[:, :, None], q_sin[:, :, None]).transpose(1, 2)
        keys = apply_rope(keys, cos[:, :, None], sin[:, :, None]).transpose(1, 2)
        return queries, keys, float(attn.scaling)

    def gather_position_embeddings(self, position_embeddings: Any, index: torch.Tensor) -> Any:
        """Keep the RoPE (cos, sin) [B, N, d] of the slots in index [B, N'] (original positions kept)."""
        return tuple(gather_slots(t, index, fill=None) for t in position_embeddings)

    def gather_position_ids(self, position_ids: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
        """position_ids [B or 1, N] -> [B, N'] for the slots in index; multi-row layouts [R, B or 1, N]
        (M-RoPE's 3 rows, or 4 with the text row first) -> [R, B, N'] row by row."""
        if position_ids is None:
            return None
        if position_ids.dim() == 3:
            return torch.stack([gather_slots(row, index, fill=None) for row in position_ids])
        return gather_slots(position_ids, index, fill=None)

    # --- pre-LLM -------------------------------------------------------------------------------------
    def has_visual_input(self, kwargs: dict[str, Any]) -> bool:
        """Whether this forward carries pixels to encode (a prefill with images/videos)."""
        return kwargs.get("pixel_values") is not None

    def visual_inputs(self, kwargs: dict[str, Any]) -> list[torch.Tensor]:
        """The tensors that carry this forward's pixels (raw, or pre-encoded by `generate`), in a fixed
        order; the runtime compares them to tell a continuation of a prompt from a new prompt."""
        tensors = [kwargs[name] for name in ("pixel_values", "pixel_values_videos") if torch.is_tensor(kwargs.get(name))]
        for kind, encoded in sorted((kwargs.get("mm_encoder_outputs") or {}).items()):
            pooled = getattr(encoded, "pooler_output", None)
            tensors += [pooled] if torch.is_tensor(pooled) else [t for t in pooled or () if torch.is_tensor(t)]
        return tensors

    def visual_input(self, kwargs: dict[str, Any], name: str) -> Any:
        """The forward kwarg `name` or, when the forward runs inside `generate` that consumed it while
        pre-encoding the pixels (e.g. `image_sizes`, `image_grid_thw`), the value the caller passed."""
        value = kwargs.get(name)
        if value is None and self.generate_inputs is not None:
            value = self.generate_inputs.get(name)
        return value

    def protected_placeholders(self, kwargs: dict[str, Any], items: list[VisualItem] | None) -> torch.Tensor | None:
        """[B, N] bool over kwargs["input_ids"]: placeholder positions that hold separators the model inserts
        itself (never reduced, not visual), or None when the family has none. items: the reduced items the
        input was rebuilt from, or None when no pre-LLM stage ran (the layout follows the pixel inputs)."""
        return None

    def install_hooks(self, token_index: Callable[[], torch.Tensor | None]) -> list[RemovableHandle]:
        """Family-specific hooks for as long as a method is applied; the runtime installs them after its own
        (a decoder layer's forward hook here sees the layer's output after the runtime's drop) and removes them
        on exit. token_index(): the forward in progress' current slot -> layer-0 position index [B, N] (-1 =
        filler), None while every token is present. None by default (Qwen3-VL: DeepStack injection)."""
        return []

    def install_vision_probe(self) -> VisionProbe:
        """Start capturing the vision layer that signals (CLS attention, keys) are computed from."""
        raise ValueError(f"{self.family} models do not expose vision-tower signals; use a method without them")

    @abstractmethod
    def encode_visual(self, kwargs: dict[str, Any], needs: frozenset[str], probe: VisionProbe | None) -> list[VisualItem]:
        """The projector features of this forward's images/videos (encoded now from pixels, or taken from
        the `mm_encoder_outputs` that `generate` computed), one VisualItem per image/video in the order
        their placeholders appear in input_ids (row-major), with the `needs` signals from `probe`."""

    @abstractmethod
    def rebuild_inputs(self, kwargs: dict[str, Any], items: list[VisualItem]) -> tuple[dict[str, Any], ShrunkSequence | None]:
        """Return forward kwargs that feed the reduced items to the LLM (sequence shrunk accordingly), and
        the shrink record (None if no token was removed)."""

    def feed_features(
        self, kwargs: dict[str, Any], encoded: dict[str, Any], placeholder_ids: list[int],
        old_counts: list[int], new_counts: list[int], run_offsets: list[torch.Tensor] | None = None,
    ) -> tuple[dict[str, Any], ShrunkSequence | None]:
        """Forward kwargs that feed `encoded` ({"image" / "video": BaseModelOutputWithPooling}) as the
        pre-encoded features instead of the pixels, with the k-th visual item's run of placeholders
        (input_ids in `placeholder_ids`, row-major) shrunk from old_counts[k] to new_counts[k]. Positions:
        with run_offsets (per item, `VisualItem.run_offsets`: families whose run is exactly the item's patches)
        and `self.original_positions`, every kept token keeps its original 1-D position; otherwise 1-D
        position_ids move down with the removed placeholders (contiguous). Returns the kwargs and the shrink
        record (None: nothing removed)."""
        kwargs = dict(kwargs)
        for name in ("pixel_values", "pixel_values_videos"):
            if name in kwargs:
                kwargs[name] = None
        # A new dict: generate reuses its own across uncached steps, which must see the unreduced features.
        kwargs["mm_encoder_outputs"] = {**(kwargs.get("mm_encoder_outputs") or {}), **encoded}
        if new_counts == old_counts:
            return kwargs, None
        input_ids = kwargs["input_ids"]
        placeholder = torch.isin(input_ids, torch.tensor(placeholder_ids, device=input_ids.device))
        shrunk = shrink_placeholders(input_ids, kwargs.get("attention_mask"), kwargs.get("position_ids"), placeholder,
                                     old_counts, new_counts, self.pad_token_id,
                                     run_offsets if self.original_positions else None)
        kwargs["input_ids"] = shrunk.input_ids
        kwargs["attention_mask"] = shrunk.attention_mask
        if shrunk.position_ids is not None:
            kwargs["position_ids"] = shrunk.position_ids
        return kwargs, shrunk

    def decode_inputs(self, kwargs: dict[str, Any], shrunk: ShrunkSequence, prompt_length: int) -> dict[str, Any]:
        """Fix a cached decode step's kwargs after a pre-LLM shrink: the caller's attention mask and position
        ids still count the original prompt length `prompt_length` (positions that stay original-length when
        the shrink kept original positions)."""
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            kwargs["attention_mask"] = torch.cat([shrunk.attention_mask.to(mask.dtype), mask[:, prompt_length:]], dim=1)
        position_ids = kwargs.get("position_ids")
        if position_ids is not None and not shrunk.original_positions:
            kwargs["position_ids"] = position_ids - shrunk.removed.to(position_ids.device)[:, None]
        return kwargs

"""Applies a method to one model instance through hooks that are all removed on exit.

Hooks installed (nothing global, nothing on classes):
- a forward pre-hook on the adapter's multimodal module: decides the phase of this forward, runs the
  pre-LLM stages and shrinks the LLM input, records which tokens are visual;
- a forward pre-hook on every decoder layer: layers after a drop get the gathered position embeddings,
  position ids and attention mask of the tokens they still compute on;
- on each dropping layer, a pre-hook on its attention module and forward hooks on its q/k projections
  (so scoring reuses the layer's own projections and position embeddings instead of recomputing them),
  and a forward hook that removes the dropped tokens from the layer's output hidden states (after folding
  them into kept tokens, for a stage that merges: `LLMStage.merge`);
- `generate` of the instance is wrapped, so that uncached generation reuses the prompt's decisions;
- the adapter's own hooks (`ModelAdapter.install_hooks`, e.g. Qwen3-VL's DeepStack injection), after these.

Phases of a forward, decided from state alone (the cache the forward carries, found by type, and the
inputs), never from keyword names or from which `generate` call is running:
- PREFILL: a new prompt (no cache, or an empty one). Stages score and decide; decisions are kept in a
  `Session`, registered under the cache the model fills (if any).
- EXTEND: no cache, and the input extends the last prompt (same leading input_ids and mask, same visual
  input) by new tokens: an uncached generate step recomputing the prompt plus the tokens generated so
  far. The prompt's decisions are reused and every new token is kept ("pruned prefill, then decoding
  without cache").
- DECODE: a non-empty cache that a leanvlm prefill filled, holding exactly the prompt plus the tokens
  decoded since (checked, as is the 2-D mask length = past + new tokens). Each layer's cache holds the
  tokens it computed on, so only the attention mask needs remapping onto those cached keys.
A non-empty cache leanvlm did not fill runs the model unchanged; a leanvlm cache whose length or mask does
not match raises one error saying what did not match. Every `generate` call starts a new prompt.
Decode positions continue from the original (post pre-LLM) sequence length.

Pre-LLM stages may ask for two things on families whose placeholder runs hold exactly their items' patches
(`ModelAdapter.run_offsets_supported`: LLaVA-1.5, the grid families, Idefics3 / SmolVLM):
- `original_positions`: the reduced tokens keep their original 1-D positions (a merged token its
  destination's patch), the text after them too, and decoding continues from the original length;
- `proportional_attention`: every layer adds log(size) to the attention logits of a key that stands for
  `size` original patches (ToMe's proportional attention: it is attended like `size` copies), in the prompt
  and in every cached decode step: through an additive mask, except in unpadded prompt layers of at least
  `runtime.attention.CHANNEL_MIN_TOKENS` slots on SDPA models, where it rides in an extra attention channel
  so that the kernel keeps its causal fast path.
"""

from __future__ import annotations

import enum
import time
import warnings
import weakref
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import PreTrainedModel

from leanvlm.compat import cache_length, find_cache, sliding_window_of
from leanvlm.models import get_adapter
from leanvlm.ops.select import FILLER, gather_slots, merge_slots, pack_right, top_k_mask
from leanvlm.runtime import attention
from leanvlm.runtime.context import LayerContext, TokenLayout
from leanvlm.runtime.masks import add_key_bias, decode_mask, reduced_attention_mask
from leanvlm.runtime.stages import INSTRUCTION, HiddenMerge, LLMStage, check_layer
from leanvlm.runtime.visual import ShrunkSequence, VisualItem
from leanvlm.stats import ReductionStats, build_stats, visual_depth

if TYPE_CHECKING:
    from leanvlm.methods.base import Method

# Model instance -> the method applied to it. Weak, so a dropped model does not stay alive here.
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, AppliedMethod] = weakref.WeakKeyDictionary()


class Phase(enum.Enum):
    PREFILL = "prefill"
    EXTEND = "extend"
    DECODE = "decode"


@dataclass
class Session:
    """Decisions made for one prompt, reused by the forwards that continue it."""

    prompt_ids: torch.Tensor  # [B, L0] input_ids the caller passed at prefill
    prompt_mask: torch.Tensor | None  # [B, L0] the caller's 2-D attention mask at prefill, None = all ones
    visual_inputs: list[torch.Tensor]  # the prompt's visual input tensors (see ModelAdapter.visual_inputs)
    prompt_length: int  # LLM input length at prefill (after any pre-LLM shrink)
    shrunk: ShrunkSequence | None
    # drop layer -> [B, N_kept] positions (prompt space) of the tokens kept after it, -1 = filler
    decisions: dict[int, torch.Tensor] = field(default_factory=dict)
    # merging drop layer -> HiddenMerge over prompt positions ([B, prompt_length]: target POSITION, weight)
    merges: dict[int, HiddenMerge] = field(default_factory=dict)
    decoded: int = 0  # tokens appended to the session's cache by cached decode steps so far
    # [B, prompt_length] float32 log(size) of every prompt slot (0 for unmerged tokens and text), or None
    key_bias: torch.Tensor | None = None

    @property
    def original_length(self) -> int:
        """input_ids length the caller passed at prefill."""
        return self.prompt_ids.shape[1]

    def extended_by(self, input_ids: torch.Tensor, mask: torch.Tensor | None, visual: list[torch.Tensor]) -> bool:
        """Whether an uncached forward's input is this prompt followed by new tokens (same visual input)."""
        length = self.original_length
        if input_ids.shape[0] != self.prompt_ids.shape[0] or input_ids.shape[1] <= length:
            return False
        if not torch.equal(input_ids[:, :length], self.prompt_ids.to(input_ids.device)):
            return False
        if (mask is None) != (self.prompt_mask is None):
            given = mask if mask is not None else self.prompt_mask
            if not bool(given[:, :length].bool().all()):
                return False
        elif mask is not None and not torch.equal(mask[:, :length].bool(), self.prompt_mask.bool().to(mask.device)):
            return False
        # a later step may carry the visual input again or not at all, never a different one
        return not visual or (len(visual) == len(self.visual_inputs) and all(
            a is b or (a.shape == b.shape and torch.equal(a, b)) for a, b in zip(visual, self.visual_inputs)))


@dataclass
class ForwardState:
    """Bookkeeping of the forward in progress."""

    phase: Phase
    session: Session
    layout: TokenLayout | None = None
    index: torch.Tensor | None = None  # [B, N] current slots -> layer-0 positions; None = all of them
    past_length: int = 0
    new_tokens: int = 0  # tokens a cached step appends
    cache: Any = None  # the KV cache of a cached step (its layers tell which keep only a sliding window)
    attn_input: tuple[torch.Tensor, Any] | None = None  # (normed hidden [B, N, D], position embeddings)
    projections: dict[str, torch.Tensor] = field(default_factory=dict)  # "q"/"k" projection outputs [B, N, *]
    # gathered layer kwargs by (drop group: -1 in prefill/extend, id of the model's mask for the layer)
    overrides: dict[tuple[int, int], dict[str, Any] | None] = field(default_factory=dict)
    layer_tokens: list[torch.Tensor] = field(default_factory=list)  # per layer [B]: real tokens computed on
    layer_visual: list[torch.Tensor] = field(default_factory=list)
    counted_index: torch.Tensor | None = None  # the `index` the last layer_tokens entry was counted for
    visual_in: torch.Tensor | None = None  # [B] visual tokens out of the projector
    visual_items: list[VisualItem] = field(default_factory=list)  # after the pre-LLM stages
    key_bias: torch.Tensor | None = None  # [B, N0] log(size) per layer-0 slot (proportional attention), or None
    seconds: float = 0.0


class AppliedMethod:
    """A method applied to one model instance. Use as a context manager; `remove()` undoes everything."""

    def __init__(self, method: Method, model: nn.Module):
        self.adapter = get_adapter(model)
        implementation = getattr(self.adapter.text_config, "_attn_implementation", None)
        if implementation not in (None, "eager", "sdpa") and "flash" not in str(implementation):
            raise ValueError(f"leanvlm supports attn_implementation 'sdpa', 'eager' and flash attention, not {implementation!r}; "
                             "load the model with attn_implementation='sdpa'")
        if model in _ACTIVE:
            other = type(_ACTIVE[model].method).__name__
            raise ValueError(
                f"a leanvlm method ({other}) is already applied to this model; leave its `with` block "
                "(or call .remove()) before applying another, or combine stages with leanvlm.Compose"
            )
        self.method = method
        self.model = model
        pre, llm = method.stages()
        self.pre_stages = list(pre)
        self.drop_stages: dict[int, LLMStage] = {}
        num_layers = self.adapter.num_layers
        for stage in llm:
            for layer in stage.layers(num_layers):
                check_layer(f"{type(stage).__name__} layer", layer, num_layers)
                if layer in self.drop_stages:
                    raise ValueError(f"two in-LLM stages drop tokens after layer {layer}; give each layer one stage")
                self.drop_stages[layer] = stage
        self.needs = frozenset().union(*(stage.needs for stage in self.pre_stages))
        exact_runs = self.adapter.run_offsets_supported
        self.adapter.original_positions = exact_runs and any(stage.original_positions for stage in self.pre_stages)
        self.proportional = exact_runs and any(stage.proportional_attention for stage in self.pre_stages)
        if self.proportional and "flash" in str(implementation):
            raise ValueError("proportional attention adds a bias to the attention logits, which flash attention cannot "
                             "take; load the model with attn_implementation='sdpa', or pass proportional_attention=False")
        # proportional attention on an SDPA model: the bias rides in the attention function (runtime.attention),
        # so unpadded prefills keep the kernel's causal fast path instead of a full-square masked call
        self._biased_sdpa = (self.proportional and implementation == "sdpa"
                             and isinstance(self.adapter.text_model, PreTrainedModel))
        self.vision_needs = self.needs - {INSTRUCTION}
        self._probe = self.adapter.install_vision_probe() if self.vision_needs else None
        self.session: Session | None = None  # the last prompt's, for uncached forwards that extend it
        # every cache a leanvlm prefill filled -> its session (weak: a cache the caller dropped is gone)
        self._sessions: weakref.WeakKeyDictionary[Any, Session] = weakref.WeakKeyDictionary()
        self.fwd: ForwardState | None = None
        self._handles: list[Any] = []
        self._install()
        _ACTIVE[model] = self

    # --- lifecycle -----------------------------------------------------------------------------------
    def _install(self) -> None:
        if self._biased_sdpa:
            attention.register_key_biased_sdpa()
            self.adapter.text_model.set_attn_implementation(attention.KEY_BIAS_SDPA)
        mm = self.adapter.multimodal_module
        self._handles.append(mm.register_forward_pre_hook(self._before_multimodal, with_kwargs=True))
        self._handles.append(mm.register_forward_hook(self._after_multimodal, always_call=True))
        for i, layer in enumerate(self.adapter.layers):
            self._handles.append(layer.register_forward_pre_hook(self._layer_input_hook(i), with_kwargs=True))
            if i in self.drop_stages:
                attn = layer.self_attn
                self._handles.append(attn.register_forward_pre_hook(self._capture_attention_input, with_kwargs=True))
                self._handles.append(attn.q_proj.register_forward_hook(self._capture_projection("q")))
                self._handles.append(attn.k_proj.register_forward_hook(self._capture_projection("k")))
                self._handles.append(layer.register_forward_hook(self._layer_output_hook(i)))
        # after the runtime's own hooks, so that the family's see each layer's output after a drop
        self._handles += self.adapter.install_hooks(lambda: self.fwd.index if self.fwd is not None else None)
        had_own = "generate" in vars(self.model)
        self._own_generate = vars(self.model).get("generate") if had_own else None
        inner_generate = self.model.generate

        def generate(*args: Any, **kwargs: Any) -> Any:
            self.session = None  # a generate call always starts a new prompt
            # generate pre-encodes the pixels and drops the inputs its encoder consumed (image sizes, grids)
            # from the forwards' kwargs; adapters look them up in the caller's inputs
            self.adapter.generate_inputs = kwargs
            try:
                return inner_generate(*args, **kwargs)
            finally:
                self.adapter.generate_inputs = None

        self.model.generate = generate
        self._had_own_generate = had_own

    def remove(self) -> None:
        """Remove every hook and restore `generate`; the model is exactly as before `apply`."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._biased_sdpa:
            self.adapter.text_model.set_attn_implementation("sdpa")
        if self._probe is not None:
            self._probe.remove()
        if "generate" in vars(self.model):
            del self.model.generate
            if self._had_own_generate:
                self.model.generate = self._own_generate
        self.session = self.fwd = None
        self._sessions = weakref.WeakKeyDictionary()
        if _ACTIVE.get(self.model) is self:
            del _ACTIVE[self.model]

    def __enter__(self) -> AppliedMethod:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    @property
    def stats(self) -> ReductionStats | None:
        return self.method.stats

    # --- multimodal module ---------------------------------------------------------------------------
    def _before_multimodal(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        start = time.perf_counter()
        if args:  # bind positional input_ids so every path below can use kwargs
            kwargs = {"input_ids": args[0], **kwargs}
            args = ()
        cache = find_cache((), kwargs)
        past_length = cache_length(cache)
        if past_length > 0:
            session = self._sessions.get(cache)
            if session is None:
                self.fwd = None  # a cache leanvlm did not prefill: every layer holds every token, run unchanged
                return args, kwargs
            fwd = self._start_decode(session, kwargs, past_length)
            fwd.cache = cache
            if session.shrunk is not None:
                kwargs = self.adapter.decode_inputs(kwargs, session.shrunk, session.original_length)
                if session.shrunk.original_positions and kwargs.get("position_ids") is None:
                    # the model would number the new tokens from the shrunk cache's length
                    new = fwd.new_tokens
                    first = session.original_length + session.decoded - new
                    kwargs["position_ids"] = torch.arange(first, first + new, device=session.prompt_ids.device)[None]
        else:
            fwd, kwargs = self._start_prompt(kwargs, Phase.EXTEND if cache is None and self._extends(kwargs) else Phase.PREFILL)
        self.fwd = fwd
        fwd.seconds += time.perf_counter() - start
        return args, kwargs

    def _extends(self, kwargs: dict[str, Any]) -> bool:
        input_ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if self.session is None or input_ids is None:
            return False
        return self.session.extended_by(input_ids, mask if mask is not None and mask.dim() == 2 else None,
                                        self.adapter.visual_inputs(kwargs))

    def _start_decode(self, session: Session, kwargs: dict[str, Any], past_length: int) -> ForwardState:
        """A cached step on a session's cache: check that the cache and the mask continue the session."""
        expected = session.prompt_length + session.decoded
        if past_length != expected:
            raise ValueError(
                f"the KV cache holds {past_length} tokens but leanvlm's prefill left {session.prompt_length} and "
                f"{session.decoded} were decoded since ({expected}); a cache that was cropped, extended outside leanvlm "
                "or reused across prompts cannot continue a reduced prefill: prefill again")
        input_ids = kwargs.get("input_ids")
        embeds = kwargs.get("inputs_embeds")
        new = input_ids.shape[1] if input_ids is not None else embeds.shape[1] if embeds is not None else None
        mask = kwargs.get("attention_mask")
        if new is not None and mask is not None and mask.dim() == 2:
            want = session.original_length + session.decoded + new
            if mask.shape[1] != want:
                raise ValueError(
                    f"attention_mask has {mask.shape[1]} columns but a cached step after a {session.original_length}-token "
                    f"prompt, {session.decoded} decoded and {new} new tokens needs {want} (past + new tokens)")
        session.decoded += new or 0
        return ForwardState(Phase.DECODE, session, past_length=past_length, new_tokens=new or 0)

    def _start_prompt(self, kwargs: dict[str, Any], phase: Phase) -> tuple[ForwardState, dict[str, Any]]:
        """Prefill or extend: run the pre-LLM stages, shrink the input, record the token layout."""
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise ValueError("leanvlm finds the visual tokens from input_ids; call the model with input_ids, not inputs_embeds")
        mask = kwargs.get("attention_mask")
        if isinstance(mask, dict):  # generate pre-built the layer masks of the unreduced prompt (compileable cache)
            raise ValueError("leanvlm needs a dynamic KV cache, not a compileable one whose masks generate builds "
                             "before the forward; pass cache_implementation='dynamic' to generate")
        prompt_mask = mask if mask is not None and mask.dim() == 2 else None
        visual_inputs = self.adapter.visual_inputs(kwargs)
        right_padded = mask is not None and mask.dim() == 2 and not bool(mask[:, -1].all())
        if phase is Phase.PREFILL and right_padded and self.adapter.generate_inputs is not None:
            raise ValueError("generate got a right-padded batch; pad on the left (tokenizer.padding_side = 'left'), "
                             "as decoder-only generation requires")
        if phase is Phase.PREFILL and right_padded and (self.pre_stages or self.drop_stages):
            warnings.warn("a right-padded batch under a leanvlm method: the output has one position per KEPT token "
                          "(dropped tokens are removed), so positions counted on the input no longer apply; pad on "
                          "the left and read logits[:, -1]", UserWarning, stacklevel=2)
        visual_in = shrunk = None
        items: list[VisualItem] = []
        reduced = False
        if self.pre_stages and self.adapter.has_visual_input(kwargs):
            reduced = True
            items = self.adapter.encode_visual(kwargs, self.vision_needs, self._probe)
            if INSTRUCTION in self.needs:
                # an uncached generate step extends the prompt: the instruction is still the prompt's own
                length = input_ids.shape[1] if phase is Phase.PREFILL else self.session.original_length
                items = self._with_instruction(input_ids[:, :length], None if prompt_mask is None else prompt_mask[:, :length],
                                               items)
            visual_in = torch.zeros(input_ids.shape[0], dtype=torch.long)
            for item in items:
                visual_in[item.sample] += item.num_tokens
            for stage in self.pre_stages:
                items = [stage.reduce(item) for item in items]
            kwargs, shrunk = self.adapter.rebuild_inputs(kwargs, items)
        mask = kwargs.get("attention_mask")
        layout = TokenLayout.from_ids(kwargs["input_ids"], mask if mask is not None and mask.dim() == 2 else None,
                                      self.adapter.visual_token_ids,
                                      self.adapter.protected_placeholders(kwargs, items if reduced else None),
                                      self.adapter.video_token_ids)
        key_bias = self._key_bias(layout, items) if self.proportional and reduced else None
        if phase is Phase.PREFILL:
            self.session = Session(input_ids, prompt_mask, visual_inputs, layout.visual.shape[1], shrunk, key_bias=key_bias)
        return ForwardState(phase, self.session, layout=layout, visual_in=visual_in, visual_items=items,
                            key_bias=key_bias), kwargs

    @staticmethod
    def _key_bias(layout: TokenLayout, items: list[VisualItem]) -> torch.Tensor | None:
        """[B, N0] float32: log(size) on the visual slots (row-major: the items' tokens in order), 0 elsewhere;
        None when no token stands for more than one patch (the attention is then exactly the model's)."""
        sizes = torch.cat([item.sizes() for item in items]) if items else torch.ones(0)
        if not bool((sizes > 1).any()):
            return None
        if sizes.numel() != int(layout.visual.sum()):
            raise RuntimeError(f"leanvlm: {sizes.numel()} reduced visual tokens but {int(layout.visual.sum())} visual "
                               "slots in the LLM input; please report this with the model's class")
        bias = torch.zeros(layout.visual.shape, dtype=torch.float32, device=layout.visual.device)
        bias[layout.visual] = sizes.to(bias.device).log()
        return bias

    def _with_instruction(self, input_ids: torch.Tensor, mask: torch.Tensor | None, items: list[VisualItem]) -> list[VisualItem]:
        """Items with `instruction` set: the LLM input embeddings [M, D] of their sample's instruction tokens
        (input_ids [B, L] before any shrink; mask [B, L] or None)."""
        question = TokenLayout.from_ids(input_ids, mask, self.adapter.visual_token_ids).question  # [B, L]
        embed = self.adapter.text_model.get_input_embeddings()
        with torch.no_grad():
            per_sample = [embed(input_ids[row][question[row]]) for row in range(input_ids.shape[0])]
        return [replace(item, instruction=per_sample[item.sample]) for item in items]

    def _after_multimodal(self, module: nn.Module, args: tuple, output: Any) -> None:
        fwd, self.fwd = self.fwd, None
        if fwd is None:
            return
        if fwd.phase is Phase.PREFILL and fwd.layer_tokens:
            self.method.stats = build_stats(self.adapter, fwd.layout, fwd.visual_in, fwd.layer_tokens, fwd.layer_visual,
                                            fwd.seconds, fwd.visual_items)
            self.method.stats.visual_depth = visual_depth(fwd.layout.visual, fwd.session.decisions, self.adapter.num_layers)
        elif self.method.stats is not None:
            self.method.stats.reduction_seconds += fwd.seconds

    # --- decoder layers ------------------------------------------------------------------------------
    def _layer_input_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
            fwd = self.fwd
            if fwd is None:
                return None
            start = time.perf_counter()
            hidden = args[0] if args else kwargs["hidden_states"]
            if layer == 0 and fwd.phase is Phase.PREFILL:
                cache = find_cache(args[1:], kwargs)  # the model may create it only now, below the hooked module
                if cache is not None:
                    self._sessions[cache] = fwd.session
            if fwd.phase is Phase.DECODE:
                override = self._decode_override(layer, hidden.shape[1], kwargs, hidden.dtype)
            else:
                self._count_tokens(fwd)
                override = (self._prompt_override(layer, kwargs, hidden.dtype)
                            if fwd.index is not None or fwd.key_bias is not None else None)
            fwd.seconds += time.perf_counter() - start
            if override is None:
                return None
            return args, {**kwargs, **override}

        return hook

    def _count_tokens(self, fwd: ForwardState) -> None:
        """Append the real and visual tokens this layer computes on; counted again only when a drop changed
        the slots since the previous layer (the counts [B] are read, never modified)."""
        if fwd.layer_tokens and fwd.counted_index is fwd.index:
            tokens, visual = fwd.layer_tokens[-1], fwd.layer_visual[-1]
        elif fwd.index is None:
            tokens, visual = fwd.layout.valid.sum(dim=1), fwd.layout.visual.sum(dim=1)
        else:
            tokens = gather_slots(fwd.layout.valid, fwd.index, fill=False).sum(dim=1)
            visual = gather_slots(fwd.layout.visual, fwd.index, fill=False).sum(dim=1)
        fwd.layer_tokens.append(tokens)
        fwd.layer_visual.append(visual)
        fwd.counted_index = fwd.index

    def _prompt_override(self, layer: int, kwargs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
        """Prefill/extend: rows and columns are the current slots (the cache is emptied at every drop); with
        proportional attention, also before any drop (every slot)."""
        fwd = self.fwd
        base = kwargs.get("attention_mask")
        key = (-1, id(base))  # the model keeps `base` alive for the whole forward
        if key not in fwd.overrides:
            index = fwd.index
            override: dict[str, Any] = {}
            if index is None:  # only the key bias to add: positions are the model's own
                batch, length = fwd.key_bias.shape
                index = torch.arange(length, device=fwd.key_bias.device).expand(batch, -1)
            else:
                override["position_embeddings"] = self.adapter.gather_position_embeddings(kwargs["position_embeddings"], index)
                override["position_ids"] = self.adapter.gather_position_ids(kwargs.get("position_ids"), index)
            plain_causal = base is None and not bool((index == FILLER).any())
            bias = None if fwd.key_bias is None else gather_slots(fwd.key_bias, index, fill=0.0)  # [B, N]
            if bias is not None and not bool(bias.any()):
                bias = None  # every merged token was dropped: nothing to add
            channel = self._biased_sdpa and index.shape[1] >= attention.CHANNEL_MIN_TOKENS
            if plain_causal and (bias is None or channel):
                # The model left causality to its attention kernel (no padding); the kept slots are still in
                # causal order with no holes, so that rule still holds and the kernel's fast causal path runs
                # (a key bias then rides in runtime.attention's extra channel instead of a mask).
                mask = None
                if bias is not None:
                    override["key_bias"] = bias
            else:
                mask = reduced_attention_mask(base, index, index, index)
                if bias is not None:
                    mask = add_key_bias(mask, bias, dtype)
            fwd.overrides[key] = {"attention_mask": mask, **override}
        return fwd.overrides[key]

    def _decode_override(self, layer: int, num_queries: int, kwargs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any] | None:
        """Cached step: the queries are the new tokens; this layer's keys are its group's kept prompt tokens
        followed by every token decoded so far."""
        fwd, session = self.fwd, self.fwd.session
        earlier = [d for d in session.decisions if d < layer]
        if not earlier and session.key_bias is None:
            return None
        group = max(earlier, default=-1)  # -1: no drop before this layer, every prompt slot is cached
        base = kwargs.get("attention_mask")
        window = sliding_window_of(fwd.cache, layer)
        key = (group, id(base), window)
        if key not in fwd.overrides:
            if earlier:
                kept = session.decisions[group]
            else:  # every prompt slot but the padding, which masks built from positions would not exclude (a key
                # bias means a merge, so the prompt was shrunk: its mask marks the padding)
                valid = session.shrunk.attention_mask.bool()
                kept = torch.where(valid, torch.arange(session.prompt_length, device=valid.device), FILLER)
            total = fwd.past_length + num_queries
            device = kept.device
            tail = torch.arange(session.prompt_length, total, device=device).expand(kept.shape[0], -1)
            cols = torch.cat([kept, tail], dim=1)
            rows_orig = torch.arange(total - num_queries, total, device=device).expand(kept.shape[0], -1)
            rows_local = torch.arange(num_queries, device=device).expand(kept.shape[0], -1)
            if window is not None:
                # the layer's cache kept only its last window - 1 slots (and attends to them + the new tokens);
                # every key the window rule allows is among them, as slots are in position order
                cols = cols[:, -(min(cols.shape[1] - num_queries, window - 1) + num_queries):]
            if window is not None or (base is not None and base.shape[-1] != total):
                # the model sized `base` for another cache layer (Gemma 3: the first global layer may come
                # after the drop) or for the unreduced window: build the mask from positions
                mask = decode_mask(base, rows_orig, cols, window)
            elif base is None and session.key_bias is None and not (kept == FILLER).any():
                mask = None  # every cached key is attended: the model's own (None) mask fits
            else:
                mask = reduced_attention_mask(base, rows_local, rows_orig, cols)
            if session.key_bias is not None:
                # decoded tokens (cols >= prompt_length) and fillers stand for themselves: bias 0
                prompt_col = torch.where(cols < session.prompt_length, cols, FILLER)
                mask = add_key_bias(mask, gather_slots(session.key_bias, prompt_col, fill=0.0), dtype)
            fwd.overrides[key] = None if mask is None else {"attention_mask": mask}
        return fwd.overrides[key]

    def _capture_attention_input(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        fwd = self.fwd
        if fwd is not None and fwd.phase is Phase.PREFILL:
            hidden = args[0] if args else kwargs["hidden_states"]
            fwd.attn_input = (hidden, kwargs["position_embeddings"])
            fwd.projections.clear()

    def _capture_projection(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            fwd = self.fwd
            if fwd is not None and fwd.phase is Phase.PREFILL:
                fwd.projections[name] = output

        return hook

    def _layer_output_hook(self, layer: int):
        stage = self.drop_stages[layer]
        attn = self.adapter.layers[layer].self_attn

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            fwd = self.fwd
            if fwd is None or fwd.phase is Phase.DECODE:
                return None
            start = time.perf_counter()
            hidden = output[0] if isinstance(output, tuple) else output
            batch, length = hidden.shape[:2]
            index = fwd.index if fwd.index is not None else torch.arange(length, device=hidden.device).expand(batch, -1)
            if fwd.phase is Phase.PREFILL:
                keep, merge = self._decide(layer, stage, attn, hidden, index)
            else:
                keep, merge = self._replay(layer, index), self._replay_merge(layer, index)
            slots = None if keep is None else pack_right(keep)
            if slots is None or (slots.shape[1] == length and not (slots == FILLER).any()):
                fwd.seconds += time.perf_counter() - start
                return None  # nothing dropped: leave the sequence untouched (bit-exact)
            if merge is not None:
                hidden = merge_slots(hidden, merge.target, merge.weight)
                if fwd.phase is Phase.PREFILL:
                    fwd.session.merges[layer] = self._merge_positions(merge, index)
            fwd.index = gather_slots(index, slots, fill=FILLER)
            fwd.overrides.clear()  # they were gathered for the previous slots
            if fwd.phase is Phase.PREFILL:
                fwd.session.decisions[layer] = fwd.index
            reduced = gather_slots(hidden, slots, fill=0)
            fwd.seconds += time.perf_counter() - start
            return (reduced, *output[1:]) if isinstance(output, tuple) else reduced

        return hook

    def _decide(self, layer: int, stage: LLMStage, attn: nn.Module, hidden: torch.Tensor,
                index: torch.Tensor) -> tuple[torch.Tensor, HiddenMerge | None]:
        """Ask the stage, then keep the non-candidates plus its top-k candidates. -> (keep [B, N] bool, the
        stage's merge of the dropped tokens into kept ones or None)."""
        fwd = self.fwd
        attn_hidden, position_embeddings = fwd.attn_input
        ctx = LayerContext(
            layer=layer,
            num_layers=self.adapter.num_layers,
            hidden=hidden,
            index=index,
            layout=fwd.layout,
            visual_into_llm=fwd.layout.visual.sum(dim=1),
            query_key=lambda rows: self.adapter.query_key(attn, attn_hidden, position_embeddings, rows,
                                                          projections=fwd.projections),
            key_bias=fwd.key_bias,
        )
        with torch.no_grad():  # ranking is not differentiable; keep it out of any autograd graph
            selection = stage.select(ctx)
        fwd.projections.clear()
        candidates = selection.candidates & (index >= 0)
        chosen = top_k_mask(selection.scores, candidates, selection.keep)
        real = gather_slots(fwd.layout.valid, index, fill=False)
        # Padding goes with the first real drop (fewer tokens, and every row then ends with its last real
        # token whatever the padding side); a stage that keeps everything leaves the sequence untouched.
        if not bool((candidates & ~chosen).any()):
            return (index >= 0) & (~candidates | chosen), None
        keep = real & (~candidates | chosen)
        with torch.no_grad():
            merge = stage.merge(ctx, keep)
        return keep, merge

    def _merge_positions(self, merge: HiddenMerge, index: torch.Tensor) -> HiddenMerge:
        """A merge over the current slots (index [B, N] -> layer-0 positions) restated over the prompt's
        positions, so that an uncached step, whose slots differ, can replay it. -> target positions [B, L]."""
        length = self.fwd.layout.visual.shape[1]
        target = torch.full((index.shape[0], length + 1), FILLER, dtype=torch.long, device=index.device)
        weight = torch.zeros(index.shape[0], length + 1, dtype=merge.weight.dtype, device=index.device)
        source = torch.where(index >= 0, index, length)  # fillers write the spare last column
        target_position = torch.where(merge.target >= 0, torch.gather(index, 1, merge.target.clamp(min=0)), FILLER)
        target.scatter_(1, source, target_position)
        weight.scatter_(1, source, merge.weight)
        return HiddenMerge(target[:, :length], weight[:, :length])

    def _replay_merge(self, layer: int, index: torch.Tensor) -> HiddenMerge | None:
        """Extend phase: the prompt's merge after this layer over the current slots (newer tokens take part
        in none)."""
        session = self.fwd.session
        merge = session.merges.get(layer)
        if merge is None:
            return None
        prompt = torch.where((index >= 0) & (index < session.prompt_length), index, FILLER)
        target_position = gather_slots(merge.target, prompt, fill=FILLER)
        weight = gather_slots(merge.weight, prompt, fill=0)
        total = self.fwd.layout.visual.shape[1]
        slot_of_position = torch.full((index.shape[0], total + 1), FILLER, dtype=torch.long, device=index.device)
        slots = torch.arange(index.shape[1], device=index.device).expand_as(index)
        slot_of_position.scatter_(1, torch.where(index >= 0, index, total), slots)
        target = torch.where(target_position >= 0, torch.gather(slot_of_position, 1, target_position.clamp(min=0)), FILLER)
        return HiddenMerge(target, weight)

    def _replay(self, layer: int, index: torch.Tensor) -> torch.Tensor | None:
        """Extend phase: keep what the prompt kept after this layer, plus every newer token."""
        session = self.fwd.session
        kept = session.decisions.get(layer)
        if kept is None:
            return None
        total = self.fwd.layout.visual.shape[1]
        marks = torch.zeros(kept.shape[0], total + 1, dtype=torch.bool, device=kept.device)
        marks.scatter_(1, torch.where(kept >= 0, kept, total), True)  # fillers land in the spare last column
        marks[:, session.prompt_length :] = True
        return gather_slots(marks[:, :total], index, fill=False)

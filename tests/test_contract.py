"""Contract tests: every assumption leanvlm's runtime makes about transformers, one named test each.

When a transformers release changes one of these, exactly the test named after it fails, with a message
that says what changed, instead of hundreds of method tests failing downstream. Each test records what the
plain model (no leanvlm method applied) passes to its own modules during a forward or `generate`.
The runtime code each assumption serves is named in the test's docstring.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from transformers import Cache, DynamicCache

from leanvlm.compat import find_cache, version_check, without_cache_arguments
from leanvlm.models import get_adapter
from tiny import PATCHES, batch_inputs, prompt_ids, tiny_llava
from tiny_families import FAMILIES, image

NEW_TOKENS = 3


@dataclass
class Call:
    """What one module forward received."""

    args: tuple
    kwargs: dict[str, Any]
    past: int = 0  # the cache's length when the forward started (the cache object keeps growing)

    @property
    def cache(self) -> Cache | None:
        return find_cache(self.args, self.kwargs)

    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]


@dataclass
class Recorder:
    """Records the forwards of the multimodal module, decoder layer 0 and its attention module."""

    multimodal: list[Call] = field(default_factory=list)
    layer: list[Call] = field(default_factory=list)
    attention: list[Call] = field(default_factory=list)

    @classmethod
    def on(cls, model) -> tuple[Recorder, list]:
        adapter = get_adapter(model)
        rec = cls()

        def record(into):
            def hook(module, args, kwargs):
                cache = find_cache(args, kwargs)
                into.append(Call(args, dict(kwargs), 0 if cache is None else cache.get_seq_length()))
            return hook

        handles = [adapter.multimodal_module.register_forward_pre_hook(record(rec.multimodal), with_kwargs=True),
                   adapter.layers[0].register_forward_pre_hook(record(rec.layer), with_kwargs=True),
                   adapter.layers[0].self_attn.register_forward_pre_hook(record(rec.attention), with_kwargs=True)]
        return rec, handles


def _record(model, run):
    rec, handles = Recorder.on(model)
    try:
        with torch.no_grad():
            result = run()
    finally:
        for h in handles:
            h.remove()
    return rec, result


@pytest.fixture(scope="module")
def llava():
    return tiny_llava(layers=3)


@pytest.fixture(scope="module")
def inputs():
    return batch_inputs([prompt_ids(3, 4), prompt_ids(1, 5, seed=1)])


def _generate(model, inputs, use_cache: bool):
    return model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=use_cache)


# --- where the cache is ------------------------------------------------------------------------------------
def test_cached_generate_passes_one_cache_object_to_every_forward(llava, inputs):
    """runtime/engine.py: a session is found again by the identity of the Cache instance its prefill filled
    (compat.find_cache looks for the argument that IS a transformers.Cache, whatever its keyword)."""
    rec, _ = _record(llava, lambda: _generate(llava, inputs, use_cache=True))
    caches = [call.cache for call in rec.multimodal]
    assert len(caches) == NEW_TOKENS, f"expected {NEW_TOKENS} forwards of the multimodal module, saw {len(caches)}"
    assert all(c is not None for c in caches), (
        "a cached generate forward passed no transformers.Cache instance to the multimodal module "
        f"(kwargs seen: {sorted(rec.multimodal[0].kwargs)})")
    assert all(c is caches[0] for c in caches), "generate passed a different Cache object to a later step"
    assert all(call.cache is caches[0] for call in rec.layer), "decoder layers received another Cache than the model"


def test_cache_is_weakly_referenceable_and_hashable():
    """runtime/engine.py keeps sessions in a WeakKeyDictionary keyed by the cache."""
    cache = DynamicCache()
    table = weakref.WeakKeyDictionary({cache: 1})
    assert table[cache] == 1


def test_cache_length_counts_the_first_layers_tokens(llava, inputs):
    """runtime/engine.py: Cache.get_seq_length() is the past length the phase decision and the decode checks
    use: after a prefill it equals the prompt length, and every cached step adds its new tokens."""
    rec, _ = _record(llava, lambda: _generate(llava, inputs, use_cache=True))
    prompt = inputs["input_ids"].shape[1]
    lengths = [call.past for call in rec.layer]
    # hooks run before the forward: the prefill sees an empty cache, step i sees prompt + i - 1 tokens
    assert lengths == [0] + [prompt + i for i in range(NEW_TOKENS - 1)], (
        f"Cache.get_seq_length() before each forward was {lengths}, expected 0 then {prompt}, {prompt + 1}, ...")


def test_model_output_carries_the_cache(llava, inputs):
    """Tests and users continue decoding from the Cache instance a forward returns (found by type)."""
    with torch.no_grad():
        out = llava(**inputs, use_cache=True)
    caches = [v for v in out.values() if isinstance(v, Cache)]
    assert len(caches) == 1, f"a use_cache=True forward returned {len(caches)} Cache instances, expected 1"


# --- the phase sequence of generate ------------------------------------------------------------------------
def test_cached_generate_phase_sequence(llava, inputs):
    """runtime/engine.py PREFILL then DECODE: the first forward carries the whole prompt and an empty cache;
    every later one carries one new token, and its 2-D mask counts past + new tokens."""
    rec, _ = _record(llava, lambda: _generate(llava, inputs, use_cache=True))
    first, later = rec.multimodal[0], rec.multimodal[1:]
    prompt = inputs["input_ids"].shape[1]
    assert first.kwargs["input_ids"].shape[1] == prompt, "generate's first forward did not carry the whole prompt"
    assert first.past == 0, "generate's first forward had a non-empty cache"
    for step, call in enumerate(later):
        past = prompt + step
        assert call.kwargs["input_ids"].shape[1] == 1, f"cached step {step} carried {call.kwargs['input_ids'].shape[1]} tokens"
        assert call.past == past, f"cached step {step}: cache length {call.past} != {past}"
        mask = call.kwargs.get("attention_mask")
        assert mask is not None and mask.dim() == 2 and mask.shape[1] == past + 1, (
            f"cached step {step}: 2-D attention mask shape {None if mask is None else tuple(mask.shape)}, expected [B, {past + 1}]")


def test_uncached_generate_phase_sequence(llava, inputs):
    """runtime/engine.py EXTEND: without a cache every forward recomputes the prompt plus the tokens generated
    so far (input_ids grow by one and keep the prompt as prefix) and carries the same visual input."""
    adapter = get_adapter(llava)
    rec, _ = _record(llava, lambda: _generate(llava, inputs, use_cache=False))
    prompt = inputs["input_ids"]
    assert len(rec.multimodal) == NEW_TOKENS
    reference = adapter.visual_inputs(rec.multimodal[0].kwargs)
    assert reference, "the first uncached forward carried no visual input tensor leanvlm recognises"
    for step, call in enumerate(rec.multimodal):
        ids = call.kwargs["input_ids"]
        assert call.past == 0, f"uncached step {step} carried a non-empty cache"
        assert ids.shape[1] == prompt.shape[1] + step, f"uncached step {step}: {ids.shape[1]} tokens"
        assert torch.equal(ids[:, :prompt.shape[1]], prompt), f"uncached step {step} does not start with the prompt"
        visual = adapter.visual_inputs(call.kwargs)
        assert not visual or all(torch.equal(a, b) for a, b in zip(visual, reference)), (
            f"uncached step {step} carried a different visual input than the prompt")


def test_generate_passes_the_visual_input_as_pixels_or_pre_encoded_features(llava, inputs):
    """models/*.py encode_visual: the prefill forward inside generate carries either `pixel_values` or
    generate's pre-encoded `mm_encoder_outputs` {"image": output with .pooler_output, a list of [T, C]}."""
    rec, _ = _record(llava, lambda: _generate(llava, inputs, use_cache=True))
    kwargs = rec.multimodal[0].kwargs
    encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
    if encoded is None:
        assert kwargs.get("pixel_values") is not None, "generate's prefill forward carried neither pixels nor features"
        return
    pooled = encoded.pooler_output
    assert len(pooled) == inputs["pixel_values"].shape[0], "mm_encoder_outputs['image'] is not one entry per image"
    assert all(t.dim() == 2 and t.shape[0] == PATCHES for t in pooled), (
        f"mm_encoder_outputs['image'].pooler_output entries have shapes {[tuple(t.shape) for t in pooled]}, expected [T, C]")


# --- what a decoder layer receives -------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_decoder_layer_kwargs(attn, inputs):
    """runtime/engine.py layer hooks: a decoder layer gets hidden_states [B, N, D] (first positional or
    `hidden_states`), `position_embeddings` = (cos, sin) [B or 1, N, d], `attention_mask` None or 4-D
    [B or 1, 1, N, K] (bool or additive float), and `position_ids` [B or 1, N] or None."""
    model = tiny_llava(layers=2, attn=attn)
    padded = inputs["attention_mask"].eq(0).any()
    rec, _ = _record(model, lambda: model(**inputs))
    call = rec.layer[0]
    hidden = call.hidden()
    batch, length = inputs["input_ids"].shape
    assert hidden.shape[:2] == (batch, length), f"decoder layer hidden_states shape {tuple(hidden.shape)}"
    cos_sin = call.kwargs.get("position_embeddings")
    assert isinstance(cos_sin, tuple) and len(cos_sin) == 2, "decoder layer got no `position_embeddings` (cos, sin) tuple"
    for t in cos_sin:
        assert t.dim() == 3 and t.shape[1] == length, f"position_embeddings entry of shape {tuple(t.shape)}, expected [B, N, d]"
    mask = call.kwargs.get("attention_mask")
    if mask is None:
        assert not padded, "a padded batch reached the decoder layer with attention_mask=None"
    else:
        assert mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[-2:] == (length, length), (
            f"decoder layer attention_mask shape {tuple(mask.shape)}, expected [B, 1, {length}, {length}]")
        assert mask.dtype == torch.bool or mask.is_floating_point(), f"attention_mask dtype {mask.dtype}"
    positions = call.kwargs.get("position_ids")
    assert positions is None or positions.shape[-1] == length, f"position_ids shape {tuple(positions.shape)}"


def test_attention_module_exposes_its_projections(llava, inputs):
    """models/base.py query_key: the attention module has q_proj / k_proj (Linear), head_dim and scaling,
    and its forward gets the normed hidden states and `position_embeddings`."""
    attn = get_adapter(llava).layers[0].self_attn
    for name in ("q_proj", "k_proj"):
        assert isinstance(getattr(attn, name, None), torch.nn.Linear), f"self_attn.{name} is not an nn.Linear"
    assert isinstance(getattr(attn, "head_dim", None), int), "self_attn.head_dim missing"
    assert isinstance(getattr(attn, "scaling", None), float), "self_attn.scaling missing"
    rec, _ = _record(llava, lambda: llava(**inputs))
    call = rec.attention[0]
    assert call.hidden().shape[:2] == inputs["input_ids"].shape, "self_attn got hidden states of another shape"
    assert isinstance(call.kwargs.get("position_embeddings"), tuple), "self_attn got no `position_embeddings` kwarg"


def test_llm_layout_is_model_dot_language_model(llava):
    """models/base.py: XForConditionalGeneration.model is the multimodal model; .model.language_model.layers
    are the decoder layers."""
    assert hasattr(llava, "model") and hasattr(llava.model, "language_model"), "no model.language_model"
    assert isinstance(llava.model.language_model.layers, torch.nn.ModuleList)


# --- family contracts --------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", [6, 7])
def test_onevision_video_signals_pool_like_apply_pooling(side):
    """models/onevision.py `_pool_video_signal`: pools per-patch vision signals exactly as the model's
    `apply_pooling` pools the video features (bilinear to ceil(side / 2) a side), bit for bit, for even and
    odd grids (LLaVA-OneVision's 27 x 27 -> 14 x 14), narrow (CLS attention) and wide (keys) signals."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=4 * side, patch_size=4, vision_use_head=False)
    text = Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=128)
    model = LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(vision_config=vision, text_config=text,
                                                                         image_token_index=120, video_token_index=121))
    adapter = get_adapter(model)
    gen = torch.Generator().manual_seed(side)
    for width in (1, 37):
        values = torch.randn(3, side * side, width, generator=gen)
        expected = model.model.apply_pooling(values)
        assert torch.equal(adapter._pool_video_signal(values), expected), "apply_pooling changed: pool signals like it"


def test_qwen_position_helper_takes_the_prompt_without_a_cache():
    """models/qwen2_vl.py: `compute_3d_position_ids` builds the prompt's M-RoPE ids [3, B, L] from input_ids,
    attention_mask and grids; its cache parameter (whatever its name) is left at its default."""
    family = FAMILIES["qwen2_vl"]
    model = family.build(layers=2)
    inputs = family.inputs(model, [[3, image(0), 4]])
    helper = model.model.compute_3d_position_ids
    given = {**inputs, "inputs_embeds": None, "cache": DynamicCache(), "past_key_values": DynamicCache()}
    call = without_cache_arguments(helper, given)
    assert not any(isinstance(v, Cache) for v in call.values())
    missing = {"input_ids", "attention_mask", "image_grid_thw"} - set(inspect.signature(helper).parameters)
    assert not missing, f"compute_3d_position_ids lost parameters {sorted(missing)}"
    positions = helper(**call)
    assert positions.shape == (3, 1, inputs["input_ids"].shape[1]), f"M-RoPE ids of shape {tuple(positions.shape)}"
    assert hasattr(model.model, "rope_deltas"), "the Qwen2-VL model no longer keeps rope_deltas"


def test_installed_transformers_is_inside_the_tested_range():
    """pyproject pins the tested range; CI runs the newest allowed version and the oldest one."""
    check = version_check("transformers")
    assert check["ok"], f"transformers {check['installed']} is outside leanvlm's tested range {check['tested']}"


def test_ci_tests_the_lower_bound_pyproject_promises():
    """pyproject's lower bound is the version `make test-oldest` (run by .ci/run) installs."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    pin = re.search(r'"transformers>=([\d.]+),<([\d.]+)"', (root / "pyproject.toml").read_text())
    oldest = re.search(r"^OLDEST_TRANSFORMERS := ([\d.]+)$", (root / "Makefile").read_text(), re.M)
    assert pin and oldest, "pyproject's transformers pin or the Makefile's OLDEST_TRANSFORMERS is missing"
    lower = tuple(int(p) for p in pin.group(1).split("."))
    assert tuple(int(p) for p in oldest.group(1).split("."))[:len(lower)] == lower, (
        f"pyproject promises transformers>={pin.group(1)} but CI's oldest pass installs {oldest.group(1)}")

"""The runtime tells prefill, uncached extension and cached decode apart from state alone: the cache a
forward carries (found by type), its length, and the inputs against the prompt's (runtime/engine.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import DynamicCache

import leanvlm
import leanvlm.compat as compat
from leanvlm.compat import find_cache
from tiny import batch_inputs, cache_of, prompt_ids, tiny_llava, with_cache


def aim():
    return leanvlm.AIM(merge_keep=0.5, l1=1, l2=4)  # pre-LLM shrink + in-LLM drops: every runtime path


@pytest.fixture(scope="module")
def model():
    return tiny_llava(layers=6)


@pytest.fixture(scope="module")
def inputs():
    return batch_inputs([prompt_ids(3, 5, seed=1), prompt_ids(1, 8, seed=2)], seed=3)


def _step(inputs, token):
    """The prompt plus one new token per row, without a cache."""
    return {**inputs, "input_ids": torch.cat([inputs["input_ids"], token], dim=1),
            "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(token)], dim=1)}


def _cached_step(model, inputs, out, token):
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], dim=1)
    return model(input_ids=token, attention_mask=mask, use_cache=True, **with_cache(model, cache_of(out)))


def test_uncached_forward_that_extends_the_prompt_equals_the_cached_step(model, inputs):
    method = aim()
    with method.apply(model):
        out = model(**inputs, use_cache=True)
        token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        cached = _cached_step(model, inputs, out, token).logits[:, -1]
        prompt_stats = method.stats
        extended = model(**_step(inputs, token)).logits[:, -1]
        assert method.stats is prompt_stats  # an extension reuses the prompt's decisions, no new prefill
    torch.testing.assert_close(extended, cached, atol=1e-4, rtol=1e-4)
    plain = model(**_step(inputs, token)).logits[:, -1]
    assert not torch.allclose(plain, cached, atol=1e-3)  # the method did change the computation


def test_same_ids_with_another_image_is_a_new_prompt(model, inputs):
    method = aim()
    other = {**inputs, "pixel_values": inputs["pixel_values"].flip(-1)}
    with method.apply(model):
        out = model(**inputs)
        token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        prompt_stats = method.stats
        got = model(**_step(other, token)).logits
        assert method.stats is not prompt_stats  # decided anew for the new image
    with aim().apply(model):
        fresh = model(**_step(other, token)).logits
    torch.testing.assert_close(got, fresh, atol=0, rtol=0)


def test_cache_changed_behind_the_runtime_is_one_clear_error(model, inputs):
    with aim().apply(model):
        out = model(**inputs, use_cache=True)
        cache = cache_of(out)
        first = cache.layers[0]
        cache.update(first.keys[:, :, :1].clone(), first.values[:, :, :1].clone(), 0)  # one token leanvlm never saw
        token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        with pytest.raises(ValueError, match=r"KV cache holds \d+ tokens but leanvlm's prefill left"):
            model(input_ids=token, use_cache=True, **with_cache(model, cache))


def test_decode_mask_of_the_wrong_length_is_one_clear_error(model, inputs):
    with aim().apply(model):
        out = model(**inputs, use_cache=True)
        token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        with pytest.raises(ValueError, match=r"attention_mask has \d+ columns .* needs \d+ \(past \+ new tokens\)"):
            model(input_ids=token, attention_mask=inputs["attention_mask"], use_cache=True,
                  **with_cache(model, cache_of(out)))


def test_cache_the_model_filled_itself_decodes_unchanged(model, inputs):
    out = model(**inputs, use_cache=True)
    token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
    legacy = DynamicCache()
    for layer in range(len(model.model.language_model.layers)):  # a copy, since a step extends the cache
        layer_cache = cache_of(out).layers[layer]
        legacy.update(layer_cache.keys.clone(), layer_cache.values.clone(), layer)
    plain = _cached_step(model, inputs, out, token).logits
    with aim().apply(model):
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], dim=1)
        got = model(input_ids=token, attention_mask=mask, use_cache=True, **with_cache(model, legacy)).logits
    torch.testing.assert_close(got, plain, atol=0, rtol=0)


def test_cache_is_found_by_type_under_any_name():
    cache = DynamicCache()
    assert find_cache((), {"a_future_name": cache, "input_ids": torch.zeros(1)}) is cache
    assert find_cache((torch.zeros(1), cache), {}) is cache
    assert find_cache((), {"past_key_values": None}) is None


def test_untested_transformers_warns_once(monkeypatch):
    monkeypatch.setattr(compat, "_warned", False)
    monkeypatch.setattr(compat, "version_check",
                        lambda package: {"name": package, "installed": "9.0.0", "tested": ">=5.20,<5.25", "ok": False})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compat.warn_if_untested()
        compat.warn_if_untested()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "transformers 9.0.0" in messages[0] and ">=5.20,<5.25" in messages[0]

"""ITP on tiny LLaVA models: the cut follows the vision attention, per-sample counts, equivalences."""

from __future__ import annotations

import pytest
import torch

import leanvlm
from leanvlm.models import get_adapter
from leanvlm.models.vision import vision_signals
from leanvlm.ops.knee import find_knee
from tiny import GENERATE_LOGITS, PATCHES, assert_cached_equals_uncached, batch_inputs, prompt_ids, select, tiny_llava

PROMPTS = [prompt_ids(3, 5, seed=1), prompt_ids(1, 9, seed=2), prompt_ids(2, 2, seed=3)]


def test_cut_follows_the_cls_attention_of_the_eager_vision_tower():
    """Stage 1 under sdpa keeps exactly the top-k patches by the CLS attention that an eager vision tower
    reports, with k the kneedle point of that curve."""
    sdpa, eager = tiny_llava(attn="sdpa", seed=4), tiny_llava(attn="eager", seed=4)
    inputs = batch_inputs(PROMPTS, seed=11)
    method = leanvlm.ITP(k_min=2, text_keep=1.0)
    with method.apply(sdpa):
        sdpa(**inputs)
    attentions = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    cls_attention = attentions[-2].mean(dim=1)[:, 0, 1:]  # layer read by the projector; CLS row; patches
    for row, sample in enumerate(method.stats.samples):
        k = max(2, find_knee(cls_attention[row], "kneedle"))
        assert sample.details["knee"] == [k]
        assert sample.visual_into_llm == k
        expected = torch.sort(cls_attention[row].topk(k).indices).values
        assert torch.equal(method.stats.visual_items[row].origin[0], expected)


def test_vision_keys_come_from_the_towers_own_projection():
    """The probe keeps the layer's k_proj output and the CLS attention is scored from it (no second
    projection of the whole tower's tokens)."""
    model = tiny_llava(attn="sdpa", seed=4)
    inputs = batch_inputs(PROMPTS, seed=11)
    probe = get_adapter(model).install_vision_probe()
    try:
        with torch.no_grad():
            model.model.get_image_features(pixel_values=inputs["pixel_values"])
            attn_input, keys, output = probe.capture()
            torch.testing.assert_close(keys, probe.attn.k_proj(attn_input))
            probe.history[-1] = (attn_input, torch.zeros_like(keys), output)  # constant keys: uniform attention
            uniform = vision_signals(probe, frozenset({"cls_attention"}), has_cls=True, prefix=1)["cls_attention"]
    finally:
        probe.remove()
    tokens = attn_input.shape[1]
    torch.testing.assert_close(uniform, torch.full_like(uniform, 1 / tokens))


def test_batch_with_different_knees_equals_samples_one_by_one():
    model = tiny_llava("qwen2", layers=6)
    inputs = batch_inputs(PROMPTS, seed=11)
    method = leanvlm.ITP(k_min=2)
    with method.apply(model):
        batch_logits = model(**inputs).logits[:, -1]
        knees = [s.details["knee"] for s in method.stats.samples]
        batch_tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, -6:]
        for row in range(len(PROMPTS)):
            one = select(inputs, row)
            torch.testing.assert_close(model(**one).logits[:, -1], batch_logits[row:row + 1], atol=1e-4, rtol=1e-4)
            assert method.stats.samples[0].details["knee"] == knees[row]
            assert model.generate(**one, max_new_tokens=6, do_sample=False)[0, -6:].tolist() == batch_tokens[row].tolist()
    assert len({k[0] for k in knees}) > 1, "the test needs samples whose knees differ"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_disabled_stages_give_plain_logits(attn):
    model = tiny_llava(attn=attn)
    inputs = batch_inputs(PROMPTS[:2], seed=5)
    plain = model(**inputs).logits
    with leanvlm.ITP(knee=None, text_keep=1.0).apply(model):
        torch.testing.assert_close(model(**inputs).logits, plain, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prune_text", [False, True])
def test_stage_two_keeps_last_token_and_assistant_prefix(prune_text):
    model = tiny_llava(layers=6)
    inputs = batch_inputs(PROMPTS, seed=5)
    length = inputs["input_ids"].shape[1]
    # a huge threshold drops every text token that may be dropped
    method = leanvlm.ITP(knee=None, text_keep=0.25, prune_text=prune_text, text_threshold=1e9)
    with method.apply(model) as applied:
        model(**inputs)
        kept = applied.session.decisions[2]  # [B, N'] positions kept after layer 2
    suffixes = [5, 9, 2]  # text tokens after the image (question + assistant prefix) per prompt
    for row, sample in enumerate(method.stats.samples):
        kept_row = set(kept[row].tolist())
        assert length - 1 in kept_row
        question = range(length - suffixes[row], length)
        assert all(position in kept_row for position in question)
        assert sample.layer_visual_tokens[3] == round(0.25 * PATCHES)
        text_before = sample.layer_tokens[0] - PATCHES - suffixes[row]
        text_after = sample.layer_tokens[3] - round(0.25 * PATCHES) - suffixes[row]
        # with prune_text only the protected tail (last 8 tokens) of the prefix text can survive
        protected = max(0, 8 - suffixes[row] - PATCHES) if prune_text else text_before
        assert text_after == (min(text_before, protected) if prune_text else text_before)


@pytest.mark.parametrize("similarity", ["attention", "cosine"])
def test_cached_generate_equals_uncached(similarity):
    model = tiny_llava("llama", "sdpa", layers=6)
    inputs = batch_inputs(PROMPTS[:2], seed=9)
    method = leanvlm.ITP(k_min=2, similarity=similarity)
    with method.apply(model):
        cached = assert_cached_equals_uncached(model, inputs)
    assert not torch.allclose(model.generate(**inputs, max_new_tokens=8, **GENERATE_LOGITS).logits[0], cached.logits[0])


def test_tower_without_cls_uses_a_reported_substitute():
    model = tiny_llava(vision_tower="siglip")
    inputs = batch_inputs(PROMPTS[:2], seed=3)
    method = leanvlm.ITP(k_min=2)
    with method.apply(model):
        model(**inputs)
    for sample in method.stats.samples:
        assert sample.details["cls_substitute"] == ["no CLS token: the mean of all tokens is the query"]
        assert 2 <= sample.visual_into_llm <= PATCHES


def test_token_fraction_is_the_mean_share_of_tokens_over_layers():
    model = tiny_llava(layers=6)
    inputs = batch_inputs(PROMPTS[:1], seed=3)
    method = leanvlm.ITP(k_min=2)
    with method.apply(model):
        model(**inputs)
    sample = method.stats.samples[0]
    full = len(PROMPTS[0])
    assert sample.token_fraction == pytest.approx(sum(sample.layer_tokens) / (6 * full))
    assert sample.token_fraction < 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(knee="elbow"), "knee must be one of kneedle, second_difference, largest_drop or None, got 'elbow'"),
    (dict(k_min=0), "k_min must be an int >= 1, got 0"),
    (dict(similarity="dot"), "similarity must be 'attention' or 'cosine', got 'dot'"),
    (dict(text_keep=0.0), r"text_keep must be in \(0, 1\], got 0.0"),
    (dict(layer=-2), "layer must be a decoder layer index >= 0, got -2"),
])
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        leanvlm.ITP(**kwargs)

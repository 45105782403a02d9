"""Edges: padding, precision, degenerate inputs, determinism, restoration under interrupts."""

from __future__ import annotations

import pytest
import torch

import leanvlm
from tiny import IMAGE_TOKEN, PAD, PATCHES, batch_inputs, prompt_ids, select, tiny_llava

METHODS = [
    lambda: leanvlm.FastV(layer=1, keep=0.5),
    lambda: leanvlm.AIM(merge_keep=0.5, l1=1, l2=4),
    lambda: leanvlm.ITP(k_min=2),
]


def right_padded(inputs):
    """The same batch with its padding moved to the right."""
    out = dict(inputs)
    ids, mask = inputs["input_ids"].clone(), inputs["attention_mask"].clone()
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        ids[row] = torch.cat([ids[row, -n:], torch.full((ids.shape[1] - n,), PAD)])
        mask[row] = torch.cat([torch.ones(n, dtype=mask.dtype), torch.zeros(ids.shape[1] - n, dtype=mask.dtype)])
    out["input_ids"], out["attention_mask"] = ids, mask
    return out


@pytest.mark.parametrize("make", METHODS)
def test_right_padding_forward_matches_samples_and_generate_refuses_it(make):
    """After a reduction every row ends with its last real token, whatever side the padding was on."""
    model = tiny_llava(layers=6)
    inputs = right_padded(batch_inputs([prompt_ids(3, 5, seed=1), prompt_ids(1, 2, seed=2)], seed=3))
    method = make()
    with method.apply(model):
        logits = model(**inputs).logits
        for row in range(2):
            one = model(**select(inputs, row)).logits[:, -1]
            torch.testing.assert_close(logits[row, -1][None], one, atol=1e-4, rtol=1e-4)
        with pytest.raises(ValueError, match="right-padded batch; pad on the left"):
            model.generate(**inputs, max_new_tokens=2)


def test_no_visual_tokens_in_one_sample_of_a_batch():
    model = tiny_llava(layers=6)
    text_only = prompt_ids(4, 6, images=0, seed=2)
    inputs = batch_inputs([prompt_ids(3, 5, seed=1), text_only], seed=3)
    inputs["pixel_values"] = inputs["pixel_values"][:1]  # one image, for the first sample only
    for make in METHODS:
        method = make()
        with method.apply(model):
            batch_last = model(**inputs).logits[1, -1]
            text_sample = method.stats.samples[1]
            alone = model(input_ids=torch.tensor([text_only])).logits[0, -1]
        torch.testing.assert_close(batch_last, alone, atol=1e-4, rtol=1e-4)
        assert text_sample.visual_in == 0 and text_sample.flops_ratio == pytest.approx(1.0)


def test_single_patch_image_keeps_its_token():
    model = tiny_llava(layers=6, image_size=8)  # patch 8: one patch per image
    inputs = {"input_ids": torch.tensor([[5, 6, IMAGE_TOKEN, 7, 8]]), "pixel_values": torch.randn(1, 3, 8, 8)}
    for make in METHODS + [lambda: leanvlm.FastV(layer=1, keep=0.01)]:
        method = make()
        with method.apply(model):
            logits = model(**inputs).logits
        assert torch.isfinite(logits).all()
        assert method.stats.samples[0].visual_into_llm == 1
        assert min(method.stats.samples[0].layer_visual_tokens) >= (0 if isinstance(method, leanvlm.AIM) else 1)


def test_keep_that_rounds_to_zero_keeps_one_visual_token():
    model = tiny_llava(layers=6)
    inputs = batch_inputs([prompt_ids(3, 5)])
    method = leanvlm.FastV(layer=1, keep=0.001)
    with method.apply(model):
        model(**inputs)
    assert method.stats.samples[0].layer_visual_tokens[2:] == [1] * 4


def test_mismatched_image_tokens_and_features_is_a_clear_error():
    model = tiny_llava(layers=6)
    inputs = batch_inputs([prompt_ids(3, 5)])
    inputs["input_ids"] = inputs["input_ids"][:, 1:]  # fine
    inputs["input_ids"][0, 0] = IMAGE_TOKEN  # one placeholder too many
    inputs["attention_mask"] = inputs["attention_mask"][:, 1:]
    with leanvlm.AIM().apply(model):
        with pytest.raises(ValueError, match=f"found {PATCHES + 1} visual placeholder tokens in input_ids but the visual features have {PATCHES}"):
            model(**inputs)


def test_inputs_embeds_without_input_ids_is_a_clear_error():
    model = tiny_llava(layers=6)
    embeds = model.get_input_embeddings()(torch.tensor([prompt_ids(2, 2, images=0)]))
    with leanvlm.FastV().apply(model):
        with pytest.raises(ValueError, match="call the model with input_ids, not inputs_embeds"):
            model(inputs_embeds=embeds)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("make", METHODS)
def test_low_precision_models_run_and_agree_with_fp32_on_what_they_keep(dtype, make):
    model = tiny_llava(layers=6).to(dtype)
    inputs = batch_inputs([prompt_ids(3, 5, seed=1), prompt_ids(1, 7, seed=2)], seed=4)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    method = make()
    with method.apply(model):
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert all(torch.isfinite(step).all() for step in out.logits)
    assert method.stats.samples[0].visual_into_llm <= PATCHES


@pytest.mark.parametrize("make", METHODS)
def test_same_input_gives_same_decisions(make):
    model = tiny_llava(layers=6)
    inputs = batch_inputs([prompt_ids(3, 5, seed=1), prompt_ids(1, 7, seed=2)], seed=4)
    method = make()
    with method.apply(model) as applied:
        first = model(**inputs).logits
        decisions = {k: v.clone() for k, v in applied.session.decisions.items()}
        second = model(**inputs).logits
        assert applied.session.decisions.keys() == decisions.keys()
        assert all(torch.equal(applied.session.decisions[k], v) for k, v in decisions.items())
    assert torch.equal(first, second)


def test_model_restored_after_keyboard_interrupt():
    model = tiny_llava(layers=6)
    inputs = batch_inputs([prompt_ids(3, 5)])
    plain = model(**inputs).logits

    def interrupt(module, args):
        raise KeyboardInterrupt

    handle = model.model.language_model.layers[3].register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        with leanvlm.AIM(merge_keep=0.5, l1=1, l2=4).apply(model):
            model(**inputs)
    handle.remove()
    assert torch.equal(model(**inputs).logits, plain)
    with leanvlm.FastV().apply(model):  # and a method can be applied again
        model(**inputs)


def test_importance_memory_stays_bounded_with_small_chunks(monkeypatch):
    """A long sequence with no room for the N x N matrix is scored chunk by chunk: no tensor of the
    computation ever holds more than chunk x N scores per head."""
    import leanvlm.ops.importance as importance

    n, heads, chunk = 1500, 2, 16
    largest = []
    real_softmax = torch.softmax

    def watched_softmax(x, dim):
        largest.append(x.numel())
        return real_softmax(x, dim=dim)

    monkeypatch.setattr(importance.torch, "softmax", watched_softmax)
    q, k = torch.randn(1, heads, n, 8), torch.randn(1, heads, n, 8)
    pos = torch.arange(n)[None]
    scores = importance.pagerank_importance(q, k, pos, pos, torch.ones(1, n, dtype=torch.bool), 8 ** -0.5,
                                            chunk_size=chunk, max_matrix_bytes=0)
    assert scores.shape == (1, n) and torch.isfinite(scores).all()
    assert largest and max(largest) <= heads * chunk * n

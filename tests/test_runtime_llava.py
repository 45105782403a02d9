"""Foundation: the runtime on LLaVA-1.5-shaped tiny models, proven with FastV."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

import leanvlm
from tiny import (GENERATE_LOGITS, IMAGE_TOKEN, PATCHES, assert_cached_equals_uncached, batch_inputs, prompt_ids, select,
                  tiny_llava)

ATTN = ["sdpa", "eager"]
TEXT = ["llama", "qwen2"]


def layer_input_lengths(model, run):
    """Sequence length every decoder layer receives while `run()` executes."""
    lengths = []
    hooks = [layer.register_forward_pre_hook(lambda mod, args: lengths.append(args[0].shape[1]))
             for layer in model.model.language_model.layers]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return lengths


def hook_snapshot(model) -> list:
    """Every forward (pre-)hook on every submodule, and whether the instance shadows `generate`.
    (transformers installs output-capturing hooks of its own at the first forward.)"""
    return [(name, tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for name, m in model.named_modules()] + [
        "generate" in vars(model)]


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("text", TEXT)
def test_keep_all_gives_plain_logits(text, attn):
    model = tiny_llava(text, attn)
    inputs = batch_inputs([prompt_ids(3, 5, seed=1), prompt_ids(1, 8, seed=2)])
    plain = model(**inputs).logits
    for method in (leanvlm.FastV(layer=2, keep=1.0), leanvlm.Compose()):
        with method.apply(model):
            reduced = model(**inputs).logits
        torch.testing.assert_close(reduced, plain, atol=1e-5, rtol=0)


def fastv_reference(model, inputs, layer_k: int, keep: float) -> torch.Tensor:
    """FastV by hand: run the layers one by one and cut the tokens after layer K. -> logits [1, N', V]."""
    lm = model.model.language_model
    ids = inputs["input_ids"]
    embeds = lm.embed_tokens(ids)
    features = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output
    embeds[ids == IMAGE_TOKEN] = torch.cat(features)
    length = ids.shape[1]
    positions = torch.arange(length)[None]
    eager = model.config._attn_implementation == "eager"

    def causal(pos):
        allowed = pos[0][None, :] <= pos[0][:, None]
        return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None] if eager else allowed[None, None]

    hidden = embeds
    rope = lm.rotary_emb(hidden, positions)
    for i in range(layer_k + 1):
        if i == layer_k:
            attn = lm.layers[i].self_attn
            x = lm.layers[i].input_layernorm(hidden)
            q = attn.q_proj(x).view(1, length, -1, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(1, length, -1, attn.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, *rope)
            k = repeat_kv(k, attn.num_key_value_groups)
            last = torch.softmax(q[:, :, -1:] @ k.transpose(-1, -2) * attn.scaling, dim=-1)  # [1, H, 1, N]
            scores = last.mean(dim=1)[0, 0]
        hidden = lm.layers[i](hidden, attention_mask=causal(positions), position_embeddings=rope, position_ids=positions)
    visual = (ids[0] == IMAGE_TOKEN).nonzero().squeeze(1)
    n_keep = round(keep * visual.numel())
    top = visual[scores[visual].topk(n_keep).indices]
    kept = torch.sort(torch.cat([(ids[0] != IMAGE_TOKEN).nonzero().squeeze(1), top])).values
    hidden, positions = hidden[:, kept], positions[:, kept]
    rope = lm.rotary_emb(hidden, positions)
    for i in range(layer_k + 1, len(lm.layers)):
        hidden = lm.layers[i](hidden, attention_mask=causal(positions), position_embeddings=rope, position_ids=positions)
    return model.lm_head(lm.norm(hidden))


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("text", TEXT)
def test_fastv_drops_after_layer_k_and_matches_hand_reference(text, attn):
    model = tiny_llava(text, attn)
    inputs = batch_inputs([prompt_ids(4, 6, seed=3)], seed=5)
    method = leanvlm.FastV(layer=2, keep=0.5)
    with method.apply(model):
        lengths = layer_input_lengths(model, lambda: model(**inputs))
        logits = model(**inputs).logits
    full = inputs["input_ids"].shape[1]
    assert lengths == [full] * 3 + [full - PATCHES // 2] * 3
    with torch.no_grad():
        expected = fastv_reference(model, inputs, layer_k=2, keep=0.5)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    sample = method.stats.samples[0]
    assert sample.layer_tokens == lengths
    assert sample.layer_visual_tokens == [PATCHES] * 3 + [PATCHES // 2] * 3
    assert sample.method_flops < sample.base_flops


@pytest.mark.parametrize("importance", ["pagerank", "text"])
def test_scoring_reuses_the_layers_own_projections(importance):
    """Each prefill runs every q/k projection of the model exactly once: the pruning layers' scores are
    built from the captured projection outputs, not from a second projection of the hidden states."""
    model = tiny_llava("qwen2", "sdpa")
    inputs = batch_inputs([prompt_ids(4, 6, seed=3), prompt_ids(2, 7, seed=4)], seed=5)
    method = leanvlm.AIM(merge_keep=1.0, l1=1, l2=4, importance=importance)
    calls: list[str] = []
    hooks = [getattr(layer.self_attn, name).register_forward_hook(lambda *a, name=name: calls.append(name))
             for layer in model.model.language_model.layers for name in ("q_proj", "k_proj")]
    try:
        with method.apply(model):
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    layers = model.config.text_config.num_hidden_layers
    assert calls.count("q_proj") == layers and calls.count("k_proj") == layers
    visual = method.stats.samples[0].layer_visual_tokens
    assert visual[1] == PATCHES > visual[2] > visual[3] > visual[4] == 0  # the stage did score and prune


@pytest.mark.parametrize("attn", ATTN)
def test_cached_generate_equals_uncached(attn):
    model = tiny_llava("qwen2", attn)
    inputs = batch_inputs([prompt_ids(3, 5, seed=7), prompt_ids(2, 2, seed=8)], seed=9)
    method = leanvlm.FastV(layer=1, keep=0.25)
    with method.apply(model):
        cached = assert_cached_equals_uncached(model, inputs)
    # the method changed the computation (otherwise this test would prove nothing)
    plain = model.generate(**inputs, max_new_tokens=8, **GENERATE_LOGITS)
    assert not torch.allclose(plain.logits[0], cached.logits[0])


@pytest.mark.parametrize("attn", ATTN)
def test_batch_equals_samples_one_by_one(attn):
    model = tiny_llava("llama", attn)
    inputs = batch_inputs([prompt_ids(3, 5, seed=1), prompt_ids(7, 1, seed=2), prompt_ids(1, 11, seed=3)], seed=4)
    method = leanvlm.FastV(layer=2, keep=0.3)
    with method.apply(model):
        batch_logits = model(**inputs).logits[:, -1]
        batch_stats = method.stats
        batch_tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, -6:]
        for row in range(3):
            one = select(inputs, row)
            torch.testing.assert_close(model(**one).logits[:, -1], batch_logits[row:row + 1], atol=1e-4, rtol=1e-4)
            assert method.stats.samples[0].layer_tokens == batch_stats.samples[row].layer_tokens
            assert model.generate(**one, max_new_tokens=6, do_sample=False)[0, -6:].tolist() == batch_tokens[row].tolist()


def test_model_restored_after_block_and_after_exception():
    model = tiny_llava()
    inputs = batch_inputs([prompt_ids(3, 5)])
    plain = model(**inputs).logits
    before = hook_snapshot(model)
    method = leanvlm.FastV(layer=1, keep=0.25)
    with method.apply(model):
        assert hook_snapshot(model) != before
        assert model(**inputs).logits.shape[1] < plain.shape[1]
    assert hook_snapshot(model) == before
    assert torch.equal(model(**inputs).logits, plain)
    with pytest.raises(RuntimeError, match="boom"):
        with method.apply(model):
            model(**inputs)
            raise RuntimeError("boom")
    assert hook_snapshot(model) == before
    assert torch.equal(model(**inputs).logits, plain)
    assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False),
                       tiny_llava().generate(**inputs, max_new_tokens=4, do_sample=False))


def test_two_models_with_different_methods_at_once():
    first, second = tiny_llava(seed=0), tiny_llava(seed=1)
    inputs = batch_inputs([prompt_ids(3, 5)])
    a, b = leanvlm.FastV(layer=1, keep=0.5), leanvlm.FastV(layer=3, keep=0.25)
    with a.apply(first), b.apply(second):
        out_first, out_second = first(**inputs).logits, second(**inputs).logits
    with a.apply(first):
        alone_first = first(**inputs).logits
    with b.apply(second):
        alone_second = second(**inputs).logits
    assert torch.equal(out_first, alone_first) and torch.equal(out_second, alone_second)
    assert a.stats.samples[0].layer_visual_tokens[2] == PATCHES // 2
    assert b.stats.samples[0].layer_visual_tokens[4] == PATCHES // 4


@pytest.mark.parametrize("keep", [0, -0.1, 1.5, float("nan"), "half", True])
def test_bad_keep_is_a_clear_error(keep):
    with pytest.raises(ValueError, match=f"keep must be in \\(0, 1\\], got {keep!r}".replace("(", "\\(").replace(")", "\\)").replace("\\\\", "\\")):
        leanvlm.FastV(keep=keep)


def test_layer_outside_model_depth_is_a_clear_error():
    model = tiny_llava(layers=6)
    before = hook_snapshot(model)
    with pytest.raises(ValueError, match=r"\[0, 5\].*got 6"):
        leanvlm.FastV(layer=6).apply(model)
    with pytest.raises(ValueError, match="got -1"):
        leanvlm.FastV(layer=-1)
    assert hook_snapshot(model) == before


def test_unsupported_model_lists_supported_ones():
    llm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, vocab_size=64))
    with pytest.raises(ValueError, match="LlamaForCausalLM.*LlavaForConditionalGeneration"):
        leanvlm.FastV().apply(llm)


def test_method_applied_twice_to_one_model_is_an_error():
    model = tiny_llava()
    before = hook_snapshot(model)
    with leanvlm.FastV().apply(model):
        with pytest.raises(ValueError, match="already applied"):
            leanvlm.FastV(keep=0.25).apply(model)
    assert hook_snapshot(model) == before


def test_no_visual_tokens_runs_unchanged_and_says_so():
    model = tiny_llava()
    ids = torch.tensor([prompt_ids(4, 6, images=0)])
    plain = model(input_ids=ids).logits
    method = leanvlm.FastV(layer=1, keep=0.5)
    with method.apply(model):
        logits = model(input_ids=ids).logits
        generated = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(logits, plain)
    assert torch.equal(generated, model.generate(input_ids=ids, max_new_tokens=4, do_sample=False))
    assert method.stats.notes == ["no visual tokens in the input: ran unchanged"]
    assert method.stats.samples[0].flops_ratio == 1.0

"""AIM on tiny LLaVA models: importance vs the model's own attention, equivalences, video, budgets."""

from __future__ import annotations

import pytest
import torch

import leanvlm
from leanvlm import flops
from leanvlm.models import get_adapter
from leanvlm.ops.attention import received_attention
from leanvlm.ops.importance import pagerank_importance
from leanvlm.methods.aim import PASS_FRACTION, ProgressivePrune, TokenMerge
from leanvlm.ops.merge import merge_tokens
from leanvlm.ops.schedule import default_prune_layers
from tiny_families import FAMILIES, image, video
from tiny import (GENERATE_LOGITS, PATCHES, assert_cached_equals_uncached, batch_inputs, cache_of, prompt_ids, select,
                  tiny_llava, with_cache)


def eager_attention_and_qk(model, inputs, layer: int):
    """The layer's attention probabilities from eager output_attentions, and its q/k recomputed by the
    adapter from the captured attention input. -> probs [B, H, N, N] float64, q, k, scale."""
    captured = {}
    attn = model.model.language_model.layers[layer].self_attn

    def grab(module, args, kwargs):
        captured["hidden"], captured["rope"] = kwargs["hidden_states"], kwargs["position_embeddings"]

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        out = model(**inputs, output_attentions=True)
    finally:
        handle.remove()
    q, k, scale = get_adapter(model).query_key(attn, captured["hidden"], captured["rope"], None)
    return out.attentions[layer].double(), q, k, scale


def dense_pagerank(probs: torch.Tensor, tau: float = 0.1, iterations: int = 5) -> torch.Tensor:
    """SPEC 1b from the model's own probabilities P = softmax(s): softmax(s / tau) = P^(1/tau) normalised."""
    powered = probs ** (1 / tau)
    matrix = powered / powered.sum(dim=-1, keepdim=True)  # [B, H, N, N]
    n = probs.shape[-1]
    p = torch.full(probs.shape[:3], 1 / n, dtype=torch.float64)[:, :, None, :]  # [B, H, 1, N]
    for _ in range(iterations):
        p = p @ matrix
    return p[:, :, 0].pow(2).mean(dim=1).sqrt()


@pytest.mark.parametrize("text", ["llama", "qwen2"])
@pytest.mark.parametrize("chunk_size, matrix_bytes", [(1, 0), (5, 0), (64, 0), (7, 2**30)])
def test_pagerank_importance_equals_dense_reference_from_eager_attention(text, chunk_size, matrix_bytes):
    model = tiny_llava(text, "eager")
    inputs = batch_inputs([prompt_ids(3, 6, seed=2)], seed=3)
    probs, q, k, scale = eager_attention_and_qk(model, inputs, layer=2)
    n = q.shape[2]
    pos = torch.arange(n)[None]
    got = pagerank_importance(q, k, pos, pos, torch.ones(1, n, dtype=torch.bool), scale,
                              chunk_size=chunk_size, max_matrix_bytes=matrix_bytes)
    torch.testing.assert_close(got.double(), dense_pagerank(probs), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_is_bit_identical_to_the_rotate_half_formula(dtype):
    """models.base.apply_rope (one temporary, in the projections' layout) = x * cos + rotate_half(x) * sin."""
    from leanvlm.models.base import apply_rope

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 3, 8, generator=gen).to(dtype)  # [B, N, heads, d]
    cos, sin = (torch.randn(2, 7, 1, 8, generator=gen).to(dtype) for _ in range(2))
    rotated = torch.cat((-x[..., 4:], x[..., :4]), dim=-1)
    assert torch.equal(apply_rope(x, cos, sin), x * cos + rotated * sin)


def test_text_importance_equals_question_rows_of_eager_attention():
    model = tiny_llava("llama", "eager")
    ids = prompt_ids(2, 7, seed=4)
    inputs = batch_inputs([ids], seed=5)
    probs, q, k, scale = eager_attention_and_qk(model, inputs, layer=1)
    question = torch.arange(2 + PATCHES, len(ids))  # text after the image
    n = q.shape[2]
    pos = torch.arange(n)[None]
    got = received_attention(q[:, :, question], k, pos[:, question], pos, torch.ones(1, n, dtype=torch.bool), scale,
                             chunk_size=3)
    expected = probs[:, :, question].mean(dim=(1, 2))
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_merge_one_and_no_pruning_gives_plain_logits(attn):
    model = tiny_llava("qwen2", attn)
    inputs = batch_inputs([prompt_ids(3, 5, seed=1), prompt_ids(6, 2, seed=2)])
    plain = model(**inputs).logits
    method = leanvlm.AIM(merge_keep=1.0, prune=False)
    with method.apply(model):
        torch.testing.assert_close(model(**inputs).logits, plain, atol=1e-5, rtol=0)
    assert method.stats.flops_ratio == 1.0


@torch.no_grad()
def merged_reference_logits(model, one: dict, keep: float, original_positions: bool, proportional: bool) -> torch.Tensor:
    """Last-position logits [1, vocab] of one unpadded sample with its image merged by `ops.merge.merge_tokens`
    (AIM's schedule), computed by hand: the merged tokens spliced into the input embeddings, position ids
    (the destinations' original ones and the text's own, or contiguous), and a 4-D additive causal mask
    with log(size) on the merged keys (or none)."""
    config = model.config
    features = model.model.get_image_features(pixel_values=one["pixel_values"], vision_feature_layer=config.vision_feature_layer,
                                              vision_feature_select_strategy=config.vision_feature_select_strategy,
                                              return_dict=True).pooler_output[0][None]  # [1, T, C]
    merged = merge_tokens(features, None, keep, pass_fraction=PASS_FRACTION)
    ids = one["input_ids"][0]
    visual = (ids == config.image_token_id).nonzero().squeeze(1)
    start, end = int(visual[0]), int(visual[-1]) + 1
    embed = model.get_input_embeddings()
    embeds = torch.cat([embed(ids[:start]), merged.tokens[0], embed(ids[end:])])[None]
    length = embeds.shape[1]
    if original_positions:
        positions = torch.cat([torch.arange(start), start + merged.kept_indices[0], torch.arange(end, ids.shape[0])])
    else:
        positions = torch.arange(length)
    bias = torch.zeros(length)
    if proportional:
        bias[start:start + merged.tokens.shape[1]] = merged.sizes[0].log()
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = torch.where(causal, bias[None, :], torch.finfo(torch.float32).min)[None, None]
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions[None]).last_hidden_state
    return model.lm_head(hidden[:, -1])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("original_positions, proportional", [(True, True), (True, False), (False, True), (False, False)])
def test_merge_equals_hand_built_positions_and_proportional_attention(attn, original_positions, proportional):
    """AIM(prune=False) in the runtime equals the merged sequence computed by hand, for each combination of
    the two options, one by one and in a left-padded batch."""
    model = tiny_llava("llama", attn, layers=4)
    inputs = batch_inputs([prompt_ids(3, 5, seed=1), prompt_ids(6, 2, seed=2)], seed=5)
    method = leanvlm.AIM(merge_keep=0.375, prune=False, original_positions=original_positions,
                         proportional_attention=proportional)
    with method.apply(model):
        batch = model(**inputs).logits[:, -1]
        for row in range(2):
            one = select(inputs, row)
            expected = merged_reference_logits(model, one, 0.375, original_positions, proportional)
            torch.testing.assert_close(model(**one).logits[:, -1], expected, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(batch[row:row + 1], expected, atol=1e-4, rtol=1e-4)
            if original_positions or proportional:  # the options change the computation: the test tells them apart
                assert not torch.allclose(expected, merged_reference_logits(model, one, 0.375, False, False), atol=1e-3)


@pytest.mark.parametrize("head_dim", [8, 12])
def test_key_bias_channel_equals_the_bias_in_a_mask(head_dim):
    """runtime.attention: the bias carried in an extra q/k channel (causal kernel, no mask) gives SDPA's output
    with the bias in an additive causal mask; GQA (4 query heads on 2 KV heads), scale given or default."""
    from torch import nn
    from leanvlm.runtime.attention import key_biased_sdpa

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, head_dim, generator=g)
    k, v = torch.randn(2, 2, 9, head_dim, generator=g), torch.randn(2, 2, 9, head_dim, generator=g)
    bias = torch.rand(2, 9, generator=g) * 2
    module = nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    for scaling in (None, 0.3):
        scale = head_dim ** -0.5 if scaling is None else scaling
        mask = torch.zeros(9, 9).masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf"))
        expected = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask + bias[:, None, None, :], scale=scale)
        got, _ = key_biased_sdpa(module, q, k, v, None, scaling=scaling, key_bias=bias)
        torch.testing.assert_close(got, expected.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_proportional_attention_on_sdpa_keeps_the_causal_fast_path(monkeypatch):
    """On an SDPA model an unpadded prefill passes the key bias to runtime.attention (no mask: the kernel's
    causal path), with the logits of the masked computation (eager), and the model's attention is SDPA again
    after remove."""
    from leanvlm.runtime import attention

    sdpa, eager = tiny_llava("qwen2", "sdpa"), tiny_llava("qwen2", "eager")
    one = batch_inputs([prompt_ids(3, 5, seed=1)], seed=4)
    seen, original = [], attention.key_biased_sdpa

    def spy(*args, key_bias=None, **kwargs):
        seen.append((args[4], key_bias))  # (attention_mask, key_bias)
        return original(*args, key_bias=key_bias, **kwargs)

    monkeypatch.setattr(attention, "key_biased_sdpa", spy)  # what apply registers
    monkeypatch.setattr(attention, "CHANNEL_MIN_TOKENS", 1)  # tiny prompts: take the channel anyway
    with leanvlm.AIM(merge_keep=0.375).apply(sdpa):
        fast = sdpa(**one).logits
    with leanvlm.AIM(merge_keep=0.375).apply(eager):
        masked = eager(**one).logits
    with leanvlm.AIM(merge_keep=0.375, proportional_attention=False).apply(eager):
        unbiased = eager(**one).logits
    torch.testing.assert_close(fast, masked, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(fast, unbiased, atol=1e-3)  # the bias matters here: a dropped one would show
    assert seen and all(mask is None for mask, _ in seen)
    assert sum(bias is not None and bool(bias.max() > 0) for _, bias in seen) >= 2  # layers 0.. until the drop
    assert sdpa.config.get_text_config()._attn_implementation == "sdpa"
    # shorter than CHANNEL_MIN_TOKENS: the bias goes into a mask, same logits
    seen.clear()
    monkeypatch.setattr(attention, "CHANNEL_MIN_TOKENS", 10_000)
    with leanvlm.AIM(merge_keep=0.375).apply(sdpa):
        torch.testing.assert_close(sdpa(**one).logits, masked, atol=1e-4, rtol=1e-4)
    assert all(bias is None for _, bias in seen) and any(mask is not None for mask, _ in seen)


def test_text_importance_after_a_merge_is_the_attention_the_model_paid():
    """With proportional attention the model attends a merged token as its s patches (+log(s) on the logits):
    the question's attention that ranks the pruning is the model's own eager attention at that layer, bias
    included, not the unbiased recomputation."""
    model = tiny_llava("llama", "eager", layers=4)
    inputs = batch_inputs([prompt_ids(3, 6, seed=4)], seed=6)
    recorded = {}

    class RecordingPrune(ProgressivePrune):
        def select(self, ctx):
            selection = super().select(ctx)
            recorded[ctx.layer] = (selection.scores, ctx.question)
            return selection

    method = leanvlm.Compose(pre=[TokenMerge(0.375)], llm=[RecordingPrune(l1=1, l2=3)])
    with method.apply(model):
        attentions = model(**inputs, output_attentions=True).attentions
    scores, question = recorded[1]
    probs = attentions[1].double()  # [1, H, N, N] over the slots layer 1 saw
    expected = probs[:, :, question[0]].mean(dim=(1, 2))
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_merge_with_original_positions_decodes_cached_like_uncached(attn):
    """Merge only (no drop inside the LLM): every cached step still needs the key bias and the original
    positions; generate's steps and a hand-written loop without position ids agree with uncached runs."""
    model = tiny_llava("qwen2", attn, layers=4)
    inputs = batch_inputs([prompt_ids(3, 5, seed=1), prompt_ids(1, 9, seed=2)], seed=3)
    method = leanvlm.AIM(merge_keep=0.375, prune=False)
    with method.apply(model):
        assert_cached_equals_uncached(model, inputs, max_new_tokens=6)
        # a loop of plain forwards without position ids: the runtime numbers the new token from the original length
        one = select(inputs, 1)
        out = model(**one, use_cache=True)
        step = out.logits[:, -1].argmax(-1, keepdim=True)
        length = one["input_ids"].shape[1]
        cached_step = model(input_ids=step, attention_mask=torch.ones(1, length + 1, dtype=torch.long),
                            **with_cache(model, cache_of(out))).logits[:, -1]
        full = model(input_ids=torch.cat([one["input_ids"], step], 1), attention_mask=torch.ones(1, length + 1, dtype=torch.long),
                     pixel_values=one["pixel_values"]).logits[:, -1]
    torch.testing.assert_close(cached_step, full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("importance", ["pagerank", "text"])
def test_default_aim_follows_schedule_and_cached_equals_uncached(attn, importance):
    model = tiny_llava("llama", attn, layers=8)  # image defaults for 8 layers: l1, l2 = 5, 7 (video: 4, 6)
    assert default_prune_layers(8, "image") == (5, 7)
    inputs = batch_inputs([prompt_ids(3, 5, seed=1), prompt_ids(1, 9, seed=2)], seed=3)
    method = leanvlm.AIM(importance=importance)
    with method.apply(model):
        cached = assert_cached_equals_uncached(model, inputs)
        stats = method.stats
    merged = 3  # an image merges to 20%: 16 -> 3 tokens
    for sample in stats.samples:
        assert sample.visual_in == PATCHES and sample.visual_into_llm == merged
        # layers 0..l1 see all, then keep(l) of the merged tokens: 1/2 after layer 5, none from layer 7 on
        assert sample.layer_visual_tokens == [merged] * 6 + [2] + [0]
    assert stats.samples[0].layer_tokens[-1] == 3 + 5
    assert not torch.allclose(model.generate(**inputs, max_new_tokens=8, **GENERATE_LOGITS).logits[0], cached.logits[0])


def test_default_follows_each_samples_modality_in_a_mixed_batch():
    """AIM() on a LLaVA-OneVision batch of an image prompt and a video prompt: the image sample runs exactly as
    AIM(merge_keep=0.2) with the image window, the video sample as AIM(merge_keep=0.25) with the SPEC's window,
    alone (logits) and in the batch (token counts per layer; this tiny OneVision's video row differs between
    batch and alone even without a method, so the batch's logits are not compared)."""
    fam = FAMILIES["llava_onevision"]
    model = fam.build("sdpa", layers=10)
    image_window, video_window = default_prune_layers(10, "image"), default_prune_layers(10, "video")
    assert image_window == (6, 9) and video_window == (5, 8)
    prompts = [[2, image(1), 5], [3, video(2, 4), 4]]
    explicit = [leanvlm.AIM(merge_keep=0.2, l1=6, l2=9), leanvlm.AIM(merge_keep=0.25, l1=5, l2=8)]
    method = leanvlm.AIM()
    with method.apply(model):
        model(**fam.inputs(model, prompts))
        batch_stats = method.stats.samples
    for row, (prompt, reference) in enumerate(zip(prompts, explicit)):
        one = fam.inputs(model, [prompt])
        with reference.apply(model):
            expected = model(**one).logits[:, -1]
            expected_stats = reference.stats.samples[0]
        with method.apply(model):
            torch.testing.assert_close(model(**one).logits[:, -1], expected, atol=1e-5, rtol=0)
            assert method.stats.samples[0].layer_visual_tokens == expected_stats.layer_visual_tokens
        assert batch_stats[row].layer_visual_tokens == expected_stats.layer_visual_tokens
        l1, l2 = (image_window, video_window)[row]
        visual = expected_stats.layer_visual_tokens
        assert visual[:l1 + 1] == [visual[0]] * (l1 + 1) and 0 < visual[l1 + 1] < visual[0] and visual[l2:] == [0] * (10 - l2)
    # the two windows and merge ratios differ, so the rows tell the modalities apart
    assert batch_stats[0].visual_into_llm / batch_stats[0].visual_in < batch_stats[1].visual_into_llm / batch_stats[1].visual_in


def test_batch_equals_samples_one_by_one():
    model = tiny_llava("qwen2", "sdpa", layers=8)
    inputs = batch_inputs([prompt_ids(3, 5, seed=1), prompt_ids(7, 1, seed=2), prompt_ids(1, 11, seed=3)], seed=4)
    method = leanvlm.AIM(merge_keep=0.5, l1=2, l2=6)
    with method.apply(model):
        batch_logits = model(**inputs).logits[:, -1]
        batch_tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, -6:]
        for row in range(3):
            one = select(inputs, row)
            torch.testing.assert_close(model(**one).logits[:, -1], batch_logits[row:row + 1], atol=1e-4, rtol=1e-4)
            assert model.generate(**one, max_new_tokens=6, do_sample=False)[0, -6:].tolist() == batch_tokens[row].tolist()


def test_video_frames_are_merged_per_frame_never_across():
    """LLaVA-1.5 style video: each frame is one image in the prompt; merging to 25% keeps 25% of EVERY frame."""
    model = tiny_llava("llama", "sdpa", layers=8)
    frames = 4
    inputs = batch_inputs([prompt_ids(2, 5, images=frames, seed=6)], seed=7, images_per_prompt=frames)
    method = leanvlm.AIM(merge_keep=0.25, prune=False)
    applied = method.apply(model)
    captured = []
    stage = applied.pre_stages[0]
    original_reduce = stage.reduce
    stage.reduce = lambda item: captured.append(original_reduce(item)) or captured[-1]
    with applied:
        logits = model(**inputs).logits
    assert method.stats.samples[0].visual_into_llm == frames * PATCHES // 4
    assert logits.shape[1] == inputs["input_ids"].shape[1] - frames * (PATCHES - PATCHES // 4)
    assert len(captured) == frames
    for item in captured:  # every frame's groups point inside its own 4 outputs
        assert item.groups[0].min() >= 0 and item.groups[0].max() < PATCHES // 4
        assert item.groups[0].unique().numel() == PATCHES // 4


@pytest.mark.parametrize("ratio", [1 / 2, 1 / 4, 1 / 7])
@pytest.mark.parametrize("preset, visual, text, frames", [("llava-1.5-7b", 576, 40, 1), ("llava-onevision-7b", 196, 100, 32)])
def test_for_budget_hits_target_within_5_percent(ratio, preset, visual, text, frames):
    method = leanvlm.AIM.for_budget(preset, flops_ratio=ratio, visual_tokens=visual, text_tokens=text, frames=frames)
    shape = flops.PRESETS[preset].llm
    tokens = method.tokens_per_layer(preset, visual, text, frames)
    base = flops.llm_prefill_flops([visual * frames + text] * shape.layers, shape)
    achieved = flops.llm_prefill_flops(tokens, shape) / base
    assert abs(achieved - ratio) / ratio <= 0.05


def test_for_budget_prefers_intact_layers_and_reports_unreachable_budgets():
    # 1/2 is reachable by merging alone: no layer needs pruning
    assert leanvlm.AIM.for_budget("llava-1.5-7b", 1 / 2, visual_tokens=576, text_tokens=40).prune is False
    with pytest.raises(ValueError, match="closest achievable"):
        leanvlm.AIM.for_budget("llava-1.5-7b", 1 / 1000, visual_tokens=576, text_tokens=40)


def test_for_budget_accepts_a_model_instance():
    model = tiny_llava("llama", "sdpa", layers=8)
    method = leanvlm.AIM.for_budget(model, 1 / 3, visual_tokens=PATCHES, text_tokens=8)
    inputs = batch_inputs([prompt_ids(3, 5)])
    with method.apply(model):
        model(**inputs)
    assert abs(1 / method.stats.flops_ratio - 1 / 3) / (1 / 3) <= 0.05


@pytest.mark.parametrize("kwargs, message", [
    (dict(merge_keep=0), r"merge_keep must be in \(0, 1\], got 0"),
    (dict(merge_keep=1.2), r"merge_keep must be in \(0, 1\], got 1.2"),
    (dict(l1=5, l2=5), "l2 > l1, got l1=5, l2=5"),
    (dict(importance="random"), "importance must be 'pagerank' or 'text', got 'random'"),
    (dict(merge_metric="value"), "merge metric must be 'features' or 'key', got 'value'"),
    (dict(merge_pass_fraction=0.7), r"pass_fraction must be in \(0, 0.5\], got 0.7"),
])
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        leanvlm.AIM(**kwargs)


def test_schedule_beyond_model_depth_is_a_clear_error():
    model = tiny_llava("llama", "sdpa", layers=6)
    with pytest.raises(ValueError, match=r"0 <= l1 < l2 <= 6.*l1=2, l2=9"):
        leanvlm.AIM(l1=2, l2=9).apply(model)


def _item(kind: str, frames: int = 1, seed: int = 0):
    from leanvlm.runtime.visual import VisualItem

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(frames, 64, 16, generator=g)
    keys = torch.randn(frames, 64, 8, generator=g)
    return x, keys, VisualItem.from_frames(x, (8, 8), 0, kind, {"keys": keys})


@pytest.mark.parametrize(("kind", "fraction"), [("image", None), ("video", None), ("video", 0.5)])
def test_merge_schedule(kind, fraction):
    """Images and video frames merge at most a quarter of their tokens per pass by default (measured,
    docs/methods/aim.md); pass_fraction=0.5 is the SPEC schedule (half per pass)."""
    from leanvlm.methods.aim import TokenMerge
    from leanvlm.ops.merge import merge_tokens

    x, _, item = _item(kind, frames=2)
    got = TokenMerge(0.25).reduce(item) if fraction is None else TokenMerge(0.25, pass_fraction=fraction).reduce(item)
    fraction = fraction or 0.25
    want = merge_tokens(x, None, 0.25, pass_fraction=fraction)
    for f in range(2):
        torch.testing.assert_close(got.frames[f], want.tokens[f], atol=0, rtol=0)
        assert torch.equal(got.origin[f], want.kept_indices[f])
    other = merge_tokens(x, None, 0.25, pass_fraction=0.75 - fraction)
    assert not torch.equal(other.assignment, want.assignment)  # the two schedules do differ on these tokens


def test_key_metric_matches_on_the_vision_keys():
    from leanvlm.methods.aim import TokenMerge
    from leanvlm.ops.merge import merge_tokens

    x, keys, item = _item("image", seed=3)
    stage = TokenMerge(0.25, metric="key")
    assert stage.needs == {"keys"} and TokenMerge(0.25).needs == frozenset()
    got = stage.reduce(item)
    want = merge_tokens(x, keys, 0.25, pass_fraction=0.25)
    assert torch.equal(got.groups[0], want.assignment[0])
    assert not torch.equal(merge_tokens(x, None, 0.25, pass_fraction=0.25).assignment, want.assignment)


def test_key_metric_on_a_model_runs_and_keeps_the_budget():
    model = tiny_llava("llama", "sdpa", layers=6)
    inputs = batch_inputs([prompt_ids(3, 5, seed=2)], seed=5)
    method = leanvlm.AIM(merge_keep=0.5, merge_metric="key", prune=False)
    with method.apply(model):
        model(**inputs)
    assert method.stats.samples[0].visual_into_llm == PATCHES // 2


def test_default_importance_is_text_for_images_and_videos():
    """AIM() ranks by the question's attention on both modalities (measured on the bundled image and video
    models, docs/methods/aim.md): in one mixed batch both samples are pruned exactly as with
    importance="text", and PageRank ranks differently."""
    family = FAMILIES["llava_onevision"]
    model = family.build(layers=4)
    inputs = family.inputs(model, [[3, image(0), 4], [2, video(1), 3]])
    logits = {}
    for importance in (None, "text", "pagerank"):
        options = {} if importance is None else {"importance": importance}
        with leanvlm.AIM(merge_keep=1.0, l1=1, l2=3, **options).apply(model):
            logits[importance] = model(**inputs).logits[:, -1]
    torch.testing.assert_close(logits[None], logits["text"], atol=1e-5, rtol=0)
    assert not torch.allclose(logits["text"], logits["pagerank"], atol=1e-4)  # the two rankings do differ


def test_one_bound_alone_works_for_images_and_videos():
    """AIM(l1=...) past the video window's default l2 still has a window for both modalities."""
    assert leanvlm.AIM(l1=25).stages()[1][0].layers(30) == [25]  # (25, 26) for both modalities
    tokens = leanvlm.AIM(l1=25).tokens_per_layer("llava-onevision-7b", 196, 20, frames=8, kind="video")  # 28 layers
    assert tokens[25] > 20 and tokens[26:] == [20, 20]

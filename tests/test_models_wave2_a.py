"""Coverage of LLaVA-NeXT, Gemma 3 and InternVL (issue 18, wave 2a): every method through the support-matrix
checks of tests/test_models.py (keep-all exact, cached == uncached, batch == samples one by one), eager and
sdpa, on the tiny models of tests/tiny_families_a.py; then what only these families have: NeXT's newline
tokens, Gemma 3's bidirectional image attention under pre-LLM and in-LLM reduction, the signals folded like
each projector (average pool, pixel shuffle) and InternViT's q/k-normed CLS attention.

Input per family ("image" in the matrix): LLaVA-NeXT one anyres image a prompt (base tile + high-resolution
grid); Gemma 3 two images in the first prompt, one in the second (two bidirectional blocks); InternVL a
3-tile image in the first prompt, a 1-tile image in the second.
"""

from __future__ import annotations

import pytest
import torch

import leanvlm
from leanvlm.methods.aim import TokenMerge
from leanvlm.models import get_adapter
from leanvlm.models.vision import vision_signals
from test_models import ATTN, GENERATE, LAYERS, METHOD_BY_NAME, METHODS, KeepEven, RecordSignals, cached
from tiny_families import IMAGE, VISION_START, image
from tiny_families_a import FAMILIES_A, tiles

MODALITY = "image"


def model_for(family: str, attn: str) -> torch.nn.Module:
    return cached(("model_a", family, attn), lambda: FAMILIES_A[family].build(attn, layers=LAYERS))


def prompts(family: str) -> list[list]:
    if family == "llava_next":
        return [[3, image(11, (30, 52)), 5], [1, image(12, (52, 30)), 8]]
    if family == "gemma3":
        return [[3, image(11), 5, image(13), 2], [1, image(12), 8]]
    return [[3, tiles(11, 3), 5], [1, tiles(12, 1), 8]]


def frame_tokens(family: str, model, prompt: list) -> list[int]:
    """Visual (non-newline) tokens of every item (tile grid) of a prompt."""
    frames = []
    fam = FAMILIES_A[family]
    for part in prompt:
        if isinstance(part, int):
            continue
        if family != "llava_next":
            frames += [fam.tokens_per_frame(model, part)] * part.frames
            continue
        single = fam.inputs(model, [[part]])
        with torch.no_grad():
            packed = model.model.get_image_features(pixel_values=single["pixel_values"], image_sizes=single["image_sizes"],
                                                    return_dict=True).pooler_output[0]
        newlines = int((packed == model.model.image_newline).all(dim=-1).sum())
        base = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
        frames += [base, packed.shape[0] - base - newlines]
    return frames


def setup(family: str, method: str, attn: str):
    fam = FAMILIES_A[family]
    model = model_for(family, attn)
    samples = prompts(family)
    inputs = cached(("inputs_a", family), lambda: fam.inputs(model, samples))
    return fam, model, samples, inputs, METHOD_BY_NAME[method]


def alone(family: str, model, samples: list[list], row: int) -> dict[str, torch.Tensor]:
    """Sample `row` on its own: its row of the batch's ids without padding, its own pixel inputs."""
    fam = FAMILIES_A[family]
    batch = fam.inputs(model, samples)
    keep = batch["attention_mask"][row].bool()
    out = fam.inputs(model, [samples[row]])
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        if key in batch:
            out[key] = batch[key][row, keep][None]
    return out


# The full matrix is 162 tests (~90 s on one core). By default: the logits check of every (family, method)
# under one attention implementation (alternating), the cache and batch checks of every other pair (so
# every method meets both checks on some family); the rest carries `matrix_full` (`pytest -m matrix_full`,
# run by CI; `-m support_matrix` runs them all).
ALL_CELLS = [(family, case.name, MODALITY, attn) for family in FAMILIES_A for case in METHODS for attn in ATTN]
PAIRS = [(i, j, family, case.name) for i, family in enumerate(FAMILIES_A)
         for j, case in enumerate(c for c in METHODS if not c.full_only)]
FAST = {
    "logits": {(family, method, ATTN[(i + j) % 2]) for i, j, family, method in PAIRS},
    "generate": {(family, method, ATTN[(i + j) // 2 % 2]) for i, j, family, method in PAIRS if (i + j) % 2 == 0},
}


def cells(check: str):
    return pytest.mark.parametrize("family, method, modality, attn", [
        cell if (cell[0], cell[1], cell[3]) in FAST[check] else pytest.param(*cell, marks=pytest.mark.matrix_full)
        for cell in ALL_CELLS])


@pytest.mark.support_matrix
@cells("logits")
def test_logits_and_token_counts(family, method, modality, attn):
    fam, model, samples, inputs, case = setup(family, method, attn)
    plain = cached(("logits_a", family, attn), lambda: model(**inputs).logits)
    applied = case.make()
    with applied.apply(model):
        logits = model(**inputs).logits
    if case.changes:
        assert not torch.allclose(logits[:, -1], plain[:, -1], atol=1e-4)
    else:
        torch.testing.assert_close(logits, plain, atol=1e-5, rtol=0)
    for row, sample in enumerate(applied.stats.samples):
        frames = cached(("frames_a", family, row), lambda: frame_tokens(family, model, samples[row]))
        assert sample.visual_in == sum(frames)
        if case.layer_visual is not None:
            assert sample.layer_visual_tokens == case.layer_visual(frames, LAYERS)
        else:
            counts = sample.layer_visual_tokens
            assert counts[0] <= sum(frames) and all(b <= a for a, b in zip(counts, counts[1:]))


@pytest.mark.support_matrix
@cells("generate")
def test_cached_decode_equals_uncached(family, method, modality, attn):
    fam, model, samples, inputs, case = setup(family, method, attn)
    applied = case.make()
    with applied.apply(model):
        with_cache = model.generate(**inputs, max_new_tokens=8, **GENERATE)
        without = model.generate(**inputs, max_new_tokens=8, use_cache=False, **GENERATE)
    assert torch.equal(with_cache.sequences, without.sequences)
    for a, b in zip(with_cache.logits, without.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    plain = cached(("generate_a", family, attn), lambda: model.generate(**inputs, max_new_tokens=8, **GENERATE))
    if case.changes:
        assert not torch.allclose(plain.logits[0], with_cache.logits[0], atol=1e-4)
    else:
        assert torch.equal(plain.sequences, with_cache.sequences)


@pytest.mark.support_matrix
@cells("generate")
def test_batch_equals_samples_one_by_one(family, method, modality, attn):
    fam, model, samples, inputs, case = setup(family, method, attn)
    applied = case.make()
    with applied.apply(model):
        batch_logits = model(**inputs).logits[:, -1]
        batch_tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, -4:]
        for row in range(len(samples)):
            single = cached(("alone_a", family, row), lambda: alone(family, model, samples, row))
            torch.testing.assert_close(model(**single).logits[:, -1], batch_logits[row:row + 1], atol=1e-4, rtol=1e-4)
            assert model.generate(**single, max_new_tokens=4, do_sample=False)[0, -4:].tolist() == batch_tokens[row].tolist()


def test_methods_restore_the_model_on_exit():
    """After a method's `with` block the model gives its plain logits again, no hook or generate left (each
    method on one family, in rotation)."""
    for i, family in enumerate(FAMILIES_A):
        model = model_for(family, "sdpa")
        inputs = FAMILIES_A[family].inputs(model, prompts(family))
        plain = model(**inputs).logits
        for case in METHODS[i::len(FAMILIES_A)]:
            with case.make().apply(model):
                model(**inputs)
            assert not model.model._forward_pre_hooks and "generate" not in vars(model)
            torch.testing.assert_close(model(**inputs).logits, plain, atol=0, rtol=0)


# --- family specifics ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES_A))
def test_identity_pre_llm_stage_rebuilds_the_exact_input(family):
    model = model_for(family, "sdpa")
    inputs = FAMILIES_A[family].inputs(model, prompts(family))
    plain = model(**inputs).logits
    with leanvlm.Compose(pre=[TokenMerge(keep=1.0)]).apply(model):
        torch.testing.assert_close(model(**inputs).logits, plain, atol=1e-5, rtol=0)


def test_llava_next_newlines_are_protected_and_rebuilt_at_row_ends():
    model = model_for("llava_next", "sdpa")
    inputs = FAMILIES_A["llava_next"].inputs(model, prompts("llava_next"))
    adapter = get_adapter(model)
    newline = model.model.image_newline
    embeds = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: embeds.append(kwargs["inputs_embeds"]), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    is_newline = (embeds[0] == newline).all(dim=-1)
    assert int(is_newline.sum()) > 0
    assert torch.equal(adapter.protected_placeholders(inputs, None), is_newline)
    items = [TokenMerge(0.25).reduce(item) for item in adapter.encode_visual(inputs, frozenset(), None)]
    assert [item.grid for item in items[:1]] == [(6, 6)] and len(items) == 4  # base + grid, per image
    rebuilt, _ = adapter.rebuild_inputs(inputs, items)
    assert int(adapter.protected_placeholders(rebuilt, items).sum()) == int(is_newline.sum())
    hires = items[1]
    packed = rebuilt["mm_encoder_outputs"]["image"].pooler_output[0][items[0].num_tokens:]
    flags = (packed == newline).all(dim=-1)
    assert int(flags.sum()) == hires.grid[0] and bool(flags[-1])
    row_of_slot = torch.cumsum(flags.long(), 0) - flags.long()
    assert torch.equal(row_of_slot[~flags], hires.origin[0] // hires.grid[1])


def gemma_by_hand(model, inputs, keep: torch.Tensor, bidirectional: bool = True) -> torch.Tensor:
    """Gemma 3 on the kept positions keep [L] of a one-sample input, image features scattered by hand, the
    model's own masks built from the kept token_type_ids. -> last-token logits [1, V]."""
    mm = model.model
    ids = inputs["input_ids"]
    embeds = mm.get_input_embeddings()(ids)
    features = mm.get_image_features(inputs["pixel_values"], return_dict=True).pooler_output
    embeds[ids == IMAGE] = features.reshape(-1, features.shape[-1])
    types = inputs["token_type_ids"][:, keep] if bidirectional else None
    return model(inputs_embeds=embeds[:, keep], token_type_ids=types).logits[:, -1]


@pytest.mark.parametrize("attn", ATTN)
def test_gemma3_pre_llm_shrink_keeps_each_image_bidirectional(attn):
    """Keeping every other token of each image equals running the model on the kept tokens with their own
    token_type_ids (each image still one bidirectional block), and differs from a causal-only run."""
    model = model_for("gemma3", attn)
    inputs = FAMILIES_A["gemma3"].inputs(model, [[3, image(61), 4, image(62), 3]])
    ids = inputs["input_ids"][0]
    keep = torch.ones_like(ids, dtype=torch.bool)
    slots = (ids == IMAGE).nonzero().squeeze(1).view(2, 16)
    keep[slots[:, 1::2].reshape(-1)] = False
    with torch.no_grad():
        expected = gemma_by_hand(model, inputs, keep)
        causal = gemma_by_hand(model, inputs, keep, bidirectional=False)
    assert not torch.allclose(expected, causal, atol=1e-4)
    method = leanvlm.Compose(pre=[KeepEven()])
    with method.apply(model):
        logits = model(**inputs).logits[:, -1]
        generated = model.generate(**inputs, max_new_tokens=1, **GENERATE)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(generated.logits[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ATTN)
def test_gemma3_in_llm_drop_keeps_the_bidirectional_mask(attn):
    """After FastV's drop at layer 1 the later layers' masks over the kept tokens are exactly the model's
    rule on their original positions: causal, or both in one image (bidirectional), and in the sliding
    layers also within the window."""
    model = model_for("gemma3", attn)
    inputs = FAMILIES_A["gemma3"].inputs(model, [[3, image(63), 4, image(64), 3]])
    seen = {}
    with leanvlm.FastV(layer=1, keep=0.5).apply(model) as applied:
        hooks = [layer.register_forward_pre_hook(
            lambda module, args, kwargs, i=i: seen.__setitem__(i, kwargs["attention_mask"]), with_kwargs=True)
            for i, layer in enumerate(model.model.language_model.layers)]
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            for hook in hooks:
                hook.remove()
        index = applied.session.decisions[1][0]  # [N_kept] original positions of the slots after layer 1
    ids = inputs["input_ids"][0]
    image_of = torch.where(ids == IMAGE, torch.cumsum((ids == VISION_START).long(), 0), 0)[index]  # 0 = text
    query, key = index[:, None], index[None, :]
    same_image = (image_of[:, None] == image_of[None, :]) & (image_of[:, None] > 0)
    assert bool((same_image & (key > query)).any())  # there are links to later tokens to keep
    window = model.config.text_config.sliding_window
    assert ids.numel() > window  # the sliding layers' window matters here
    for layer in (2, 3):
        mask = seen[layer][0, 0]
        allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        expected = (key <= query) | same_image
        if model.config.text_config.layer_types[layer] == "sliding_attention":
            expected &= key > query - window
        assert allowed.shape == (index.numel(), index.numel()) and index.numel() < ids.numel()
        assert torch.equal(allowed, expected)


# --- vision signals ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES_A))
def test_vision_signals_per_item_in_forward_and_generate(family):
    """Every item (tile grid) gets one signal per token; generate (which encodes before the first forward)
    hands the stages the same signals as a plain forward; towers without CLS say so."""
    model = model_for(family, "sdpa")
    inputs = FAMILIES_A[family].inputs(model, prompts(family))
    forward_stage, generate_stage = RecordSignals(seen=[]), RecordSignals(seen=[])
    with leanvlm.Compose(pre=[forward_stage]).apply(model):
        model(**inputs)
    with leanvlm.Compose(pre=[generate_stage]).apply(model):
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert len(forward_stage.seen) == len(generate_stage.seen) == len(frame_tokens(family, model, prompts(family)[0])) + \
        len(frame_tokens(family, model, prompts(family)[1]))
    for a, b in zip(forward_stage.seen, generate_stage.seen):
        tokens = a.frames[0].shape[0]
        for name in ("cls_attention", "cls_similarity"):
            assert a.signals[name].shape == (1, tokens)
            torch.testing.assert_close(a.signals[name], b.signals[name])
        assert a.signals["keys"].shape[:2] == (1, tokens)
        torch.testing.assert_close(a.signals["keys"], b.signals["keys"])
        assert ("cls_substitute" in a.info) == (family == "gemma3")  # SigLIP: mean token; CLIP, InternViT: CLS


@pytest.mark.parametrize("family, kernel", [("gemma3", 2), ("internvl", 2)])
def test_signals_fold_the_patches_each_token_is_made_of(family, kernel):
    """The fold groups, for LLM token (r, c) of the s x s grid, exactly the patches of the k x k block at
    (k r .. k r + k - 1, k c .. k c + k - 1): the model's own pooling / pixel-shuffle grouping."""
    model = model_for(family, "sdpa")
    adapter = get_adapter(model)
    side = 8  # patches per side of the tiny towers
    index = torch.arange(side * side, dtype=torch.float)[None, :, None]  # [1, P*P, 1]: each patch's raster index
    folded = adapter._fold(index)[0, :, :, 0]  # [T, k*k]
    rows, cols = torch.div(folded, side, rounding_mode="floor"), folded % side
    tokens = side // kernel
    token_row = torch.arange(tokens * tokens)[:, None] // tokens
    token_col = torch.arange(tokens * tokens)[:, None] % tokens
    assert torch.equal(rows // kernel, token_row.expand_as(rows).float())
    assert torch.equal(cols // kernel, token_col.expand_as(cols).float())
    assert all(len(set(group.tolist())) == kernel * kernel for group in folded)
    if family == "internvl":  # the model's pixel shuffle puts exactly those patches' channels into one token
        values = torch.randn(1, side * side, 3)
        shuffled = model.model.pixel_shuffle(values.view(1, side, side, 3)).reshape(1, tokens * tokens, -1)
        gathered = values[0, folded.long()].reshape(tokens * tokens, -1)
        torch.testing.assert_close(shuffled[0], gathered)


def test_internvl_cls_attention_is_the_towers_own_attention():
    """With InternViT's q/k norms on, the CLS attention signal equals the eager tower's attention
    probabilities of its CLS query (head mean, CLS column dropped), summed over each token's 2 x 2 block."""
    model = model_for("internvl", "eager")
    adapter = get_adapter(model)
    inputs = FAMILIES_A["internvl"].inputs(model, prompts("internvl"))
    assert model.config.vision_config.use_qk_norm
    probe = adapter.install_vision_probe()
    try:
        with torch.no_grad():
            tower = model.model.vision_tower(pixel_values=inputs["pixel_values"], output_attentions=True)
            signals = vision_signals(probe, frozenset({"cls_attention"}), True, 1)["cls_attention"]
            folded = adapter._signals(probe, frozenset({"cls_attention"}), inputs)["cls_attention"]
    finally:
        probe.remove()
    own = tower.attentions[-1].mean(dim=1)[:, 0, 1:]  # [tiles, patches]
    torch.testing.assert_close(signals, own, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(folded, adapter._fold(own[..., None]).sum(dim=2)[..., 0], atol=1e-5, rtol=1e-4)
    assert folded.shape == (inputs["pixel_values"].shape[0], 16)


def test_gemma3_similarity_signal_matches_the_projector_pool():
    """cls_similarity per token = the mean over its pooling window of the patch outputs' cosine with the
    mean output (SigLIP has no CLS), pooled with the projector's own AvgPool2d."""
    model = model_for("gemma3", "sdpa")
    adapter = get_adapter(model)
    inputs = FAMILIES_A["gemma3"].inputs(model, prompts("gemma3"))
    probe = adapter.install_vision_probe()
    try:
        with torch.no_grad():
            model.model.get_image_features(inputs["pixel_values"], return_dict=True)
            signal = adapter._signals(probe, frozenset({"cls_similarity"}), inputs)["cls_similarity"]
            output = probe.capture()[2]
    finally:
        probe.remove()
    cosine = torch.cosine_similarity(output, output.mean(dim=1, keepdim=True), dim=-1)  # [images, 64]
    pooled = model.model.multi_modal_projector.avg_pool(cosine.view(-1, 1, 8, 8)).flatten(1)
    torch.testing.assert_close(signal, pooled)


def test_compileable_cache_is_refused_in_one_line():
    model = model_for("gemma3", "sdpa")
    inputs = FAMILIES_A["gemma3"].inputs(model, prompts("gemma3"))
    with leanvlm.FastV(layer=1, keep=0.5).apply(model):
        with pytest.raises(ValueError, match="cache_implementation='dynamic'"):
            model.generate(**inputs, max_new_tokens=2, do_sample=False, cache_implementation="static")


# --- FLOPs presets ---------------------------------------------------------------------------------------
def _published_configs() -> dict[str, object]:
    """The three checkpoints' configs, written from their published config.json numbers (no download)."""
    from transformers import (CLIPVisionConfig, Gemma3Config, Gemma3TextConfig, InternVLConfig, InternVLVisionConfig,
                              LlamaConfig, LlavaNextConfig, Qwen2Config, SiglipVisionConfig)

    return {
        "llava-next-7b": LlavaNextConfig(
            vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                           num_attention_heads=16, image_size=336, patch_size=14),
            text_config=LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                    num_attention_heads=32, num_key_value_heads=32, vocab_size=32064)),
        "internvl3-8b": InternVLConfig(
            vision_config=InternVLVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                               num_attention_heads=16, image_size=[448, 448], patch_size=[14, 14]),
            text_config=Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                    num_attention_heads=28, num_key_value_heads=4, vocab_size=151674)),
        "gemma-3-4b": Gemma3Config(
            vision_config=SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                             num_attention_heads=16, image_size=896, patch_size=14),
            text_config=Gemma3TextConfig(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                                         num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                                         vocab_size=262208),
            mm_tokens_per_image=256),
    }


@pytest.mark.parametrize("name", ["llava-next-7b", "internvl3-8b", "gemma-3-4b"])
def test_flops_presets_equal_what_the_config_reader_makes_of_the_published_configs(name):
    from leanvlm.flops import PRESETS, flops, preset_from_config

    preset, expected = preset_from_config(_published_configs()[name]), PRESETS[name]
    assert (preset.llm, preset.vision, preset.image_tokens) == (expected.llm, expected.vision, expected.image_tokens)
    report = flops(name, image=True, method="fastv")
    assert 1 < report.ratio < 3  # FastV keeps half the visual tokens after layer 2: a saving, bounded


# --- transformers contract (runtime.engine's sliding-window decode masks) ----------------------------------
def test_contract_sliding_cache_layers_keep_their_last_window_minus_one_tokens():
    """compat.sliding_window_of finds each cache layer's window, and such a layer keeps exactly its last
    W - 1 tokens (the runtime's decode mask in a layer after an in-LLM drop assumes both)."""
    from leanvlm.compat import cache_of, sliding_window_of

    model = model_for("gemma3", "sdpa")
    inputs = FAMILIES_A["gemma3"].inputs(model, [[3, image(65), 4, image(66), 3]])
    with torch.no_grad():
        cache = cache_of(model(**inputs, use_cache=True))
    window = model.config.text_config.sliding_window
    layer_types = model.config.text_config.layer_types
    assert [sliding_window_of(cache, i) for i in range(LAYERS)] == [
        window if kind == "sliding_attention" else None for kind in layer_types]
    length = inputs["input_ids"].shape[1]
    assert length > window
    for i, kind in enumerate(layer_types):
        assert cache.layers[i].keys.shape[-2] == (window - 1 if kind == "sliding_attention" else length)
    assert sliding_window_of(None, 0) is None


@pytest.mark.parametrize("method", ["fastv", "aim"])
def test_gemma3_global_layers_only_after_the_drop(method):
    """Layers 0-2 sliding, layer 3 global (as in the real model, whose first global layer is the 6th): the
    model sizes its global mask by layer 3's cache, which holds only the kept tokens; cached decoding past
    the window still equals uncached, and a batch equals its samples."""
    from tiny_families_a import Gemma3

    late = Gemma3()
    late.global_every = LAYERS
    model = cached(("model_a", "gemma3_late_global"), lambda: late.build("sdpa", layers=LAYERS))
    assert model.config.text_config.layer_types == ["sliding_attention"] * 3 + ["full_attention"]
    samples = prompts("gemma3")
    inputs = late.inputs(model, samples)
    applied = METHOD_BY_NAME[method].make()
    with applied.apply(model):
        with_cache = model.generate(**inputs, max_new_tokens=8, **GENERATE)
        without = model.generate(**inputs, max_new_tokens=8, use_cache=False, **GENERATE)
        single = model.generate(**alone("gemma3", model, samples, 1), max_new_tokens=8, do_sample=False)
    assert torch.equal(with_cache.sequences, without.sequences)
    for a, b in zip(with_cache.logits, without.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert single[0, -8:].tolist() == with_cache.sequences[1, -8:].tolist()

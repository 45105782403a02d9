"""Model coverage: every method on every supported family, image / video / mixed inputs, eager and sdpa.

The family x method x modality x attention tests carry the `support_matrix` marker; conftest.py records
their outcomes (`pytest --support-matrix results.json`) and `scripts/support_matrix.py` renders them as
docs/support_matrix.md. To cover a new method, add one `MethodCase` to METHODS; to cover a new family, add
its tiny builder to tests/tiny_families.py.

Family-specific tests below check what the generic ones cannot see: the packing of LLaVA-OneVision /
LLaVA-NeXT-Video newline tokens, Qwen's original M-RoPE ids of surviving tokens and rope_deltas, and the
vision signals (no CLS, packed towers, generate's pre-encoding).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import leanvlm
from leanvlm.methods.aim import TokenMerge
from leanvlm.methods import make_method
from leanvlm.methods.base import PreLLMStage
from leanvlm.models import get_adapter
from leanvlm.models.vision import restore_unit_order
from leanvlm.runtime.visual import VisualItem
from tiny import cache_of, with_cache
from tiny_families import FAMILIES, IMAGE, VIDEO, Family, Visual, image, video

LAYERS = 4
ATTN = ["sdpa", "eager"]




GENERATE = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)


# --- methods -------------------------------------------------------------------------------------------
def half(n: int) -> int:
    return max(1, round(n / 2)) if n else 0


@dataclass(frozen=True)
class MethodCase:
    """A method as the coverage tests run it. layer_visual(frames, layers): the visual tokens every decoder
    layer must compute on, given the visual tokens of every frame (image tile grid / video frame) of a
    sample. changes=False: the method must reproduce the plain model."""

    name: str
    make: Callable[[], leanvlm.Method]
    layer_visual: Callable[[list[int], int], list[int]] | None  # None: input-dependent, not checked
    changes: bool = True
    full_only: bool = False  # a wave-2 peer: its cells are `matrix_full` (CI and the support-matrix script)


def _aim_layers(frames: list[int], layers: int) -> list[int]:
    merged = sum(half(t) for t in frames)  # merge_keep=0.5 halves every frame
    return [merged, merged, half(merged)] + [0] * (layers - 3)  # l1=1, l2=3: 1/2 after layer 1, none from layer 3


METHODS = [
    MethodCase("keep_all", lambda: leanvlm.AIM(merge_keep=1.0, prune=False),
               lambda frames, layers: [sum(frames)] * layers, changes=False),
    MethodCase("fastv", lambda: leanvlm.FastV(layer=1, keep=0.5),
               lambda frames, layers: [sum(frames)] * 2 + [half(sum(frames))] * (layers - 2)),
    MethodCase("aim", lambda: leanvlm.AIM(merge_keep=0.5, l1=1, l2=3), _aim_layers),
    # the peers (SPEC 2, 3), at options that fit a 4-layer model; their token counts depend on the input
    MethodCase("itp", lambda: make_method("itp", layer=1), None),
    MethodCase("visionzip", lambda: make_method("visionzip", keep=0.5), None),
    MethodCase("prumerge+", lambda: make_method("prumerge+"), None),
    MethodCase("pyramiddrop", lambda: make_method("pyramiddrop", layers=[1, 2], ratios=[0.5, 0.5]), None),
    MethodCase("random", lambda: make_method("random", keep=0.5), None),
    MethodCase("pool", lambda: make_method("pool"), None),
    # the wave-2 peers (issue 21): every family in CI, not in the default run (their own files test them on
    # LLaVA / OneVision / Qwen2-VL by default)
    *[MethodCase(name, make, None, full_only=True) for name, make in (
        ("divprune", lambda: make_method("divprune", keep=0.5)),
        ("cdpruner", lambda: make_method("cdpruner", keep=0.5)),
        ("vispruner", lambda: make_method("vispruner", keep=0.5)),
        ("dart", lambda: make_method("dart", layer=1, keep=0.5)),
        ("holitom", lambda: make_method("holitom", keep=0.5)),
        ("fastvid", lambda: make_method("fastvid", keep=0.5)),
    )],
]
METHOD_BY_NAME = {case.name: case for case in METHODS}


# --- families, inputs ----------------------------------------------------------------------------------
def modalities(family: Family) -> list[str]:
    return ["image"] + (["video"] if family.videos else []) + (["mixed"] if family.mixed else [])


def prompts(family: Family, modality: str) -> list[list]:
    """Two samples with different text and visual inputs (so the batch is left-padded)."""
    llava_style = family.name in ("llava", "llava_onevision", "llava_next_video")
    a, b = ((30, 52), (52, 30)) if llava_style else ((8, 12), (12, 8))

    def clip(seed: int) -> Visual:
        return video(seed, 3) if llava_style else video(seed, 4, (8, 8))

    if modality == "image":
        return [[3, image(11, a), 5], [1, image(12, b), 8]]
    if modality == "video":
        return [[3, clip(21), 5], [2, clip(22), 7]]
    return [[2, image(31, a), 2, clip(32), 4], [4, clip(33), 6]]


_CACHE: dict[tuple, object] = {}


def cached(key: tuple, make: Callable[[], object]) -> object:
    """Models, inputs and plain-model outputs are shared by the tests (methods leave models unchanged)."""
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def model_for(family: str, attn: str) -> torch.nn.Module:
    return cached(("model", family, attn), lambda: FAMILIES[family].build(attn, layers=LAYERS))


def frame_tokens(family: Family, model, prompt: list) -> list[int]:
    """Visual (non-newline) tokens of every frame of a prompt, from the model's own feature helpers."""
    frames = []
    for part in prompt:
        if isinstance(part, int):
            continue
        if family.name.startswith("qwen"):
            t = 1 if part.kind == "image" else part.frames // 2
            frames += [part.size[0] * part.size[1] // 4] * t
        elif part.kind == "video":
            frames += [family.tokens_per_frame(model, part)] * part.frames
        elif family.name == "llava":
            frames.append(family.tokens_per_frame(model, part))
        else:
            single = family.inputs(model, [[part]])
            with torch.no_grad():
                packed = model.model.get_image_features(pixel_values=single["pixel_values"],
                                                        image_sizes=single["image_sizes"], return_dict=True).pooler_output[0]
            newlines = int((packed == model.model.image_newline).all(dim=-1).sum())
            base = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
            frames += [base, packed.shape[0] - base - newlines]
    return frames


CELLS = [pytest.param(family, method.name, modality, attn, marks=[pytest.mark.matrix_full] if method.full_only else [])
         for family, fam in FAMILIES.items() for modality in modalities(fam) for method in METHODS for attn in ATTN]
cells = pytest.mark.parametrize("family, method, modality, attn", CELLS)


def setup(family: str, method: str, modality: str, attn: str):
    fam = FAMILIES[family]
    model = model_for(family, attn)
    samples = prompts(fam, modality)
    inputs = cached(("inputs", family, modality), lambda: fam.inputs(model, samples))
    return fam, model, samples, inputs, METHOD_BY_NAME[method]


def plain_logits(family: str, modality: str, attn: str, model, inputs) -> torch.Tensor:
    return cached(("logits", family, modality, attn), lambda: model(**inputs).logits)


def plain_generate(family: str, modality: str, attn: str, model, inputs):
    return cached(("generate", family, modality, attn), lambda: model.generate(**inputs, max_new_tokens=8, **GENERATE))


def alone(fam: Family, model, samples: list[list], row: int) -> dict[str, torch.Tensor]:
    """Sample `row` of the batch on its own: its row of the batch's token ids without the padding, and the
    pixel inputs of its own images / videos."""
    batch = fam.inputs(model, samples)
    keep = batch["attention_mask"][row].bool()
    out = fam.inputs(model, [samples[row]])
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in batch:
            out[key] = batch[key][row, keep][None]
    return out


# --- the support matrix ----------------------------------------------------------------------------------
@pytest.mark.support_matrix
@cells
def test_logits_and_token_counts(family, method, modality, attn):
    """keep-all reproduces the plain model's logits; reducing methods change them and report the visual
    tokens every layer computed on (AIM merge 0.5 halves every frame, FastV keeps half after layer 1)."""
    fam, model, samples, inputs, case = setup(family, method, modality, attn)
    plain = plain_logits(family, modality, attn, model, inputs)
    applied = case.make()
    with applied.apply(model):
        logits = model(**inputs).logits
    if case.changes:
        assert not torch.allclose(logits[:, -1], plain[:, -1], atol=1e-4)
    else:
        torch.testing.assert_close(logits, plain, atol=1e-5, rtol=0)
    for row, sample in enumerate(applied.stats.samples):
        frames = cached(("frames", family, modality, row), lambda: frame_tokens(fam, model, samples[row]))
        assert sample.visual_in == sum(frames)
        if case.layer_visual is not None:
            assert sample.layer_visual_tokens == case.layer_visual(frames, LAYERS)
        else:  # at least: never more visual tokens than came in, never more in a later layer
            counts = sample.layer_visual_tokens
            assert counts[0] <= sum(frames) and all(b <= a for a, b in zip(counts, counts[1:]))


@pytest.mark.support_matrix
@cells
def test_cached_decode_equals_uncached(family, method, modality, attn):
    """8 greedy tokens: the cached run (pruned prefill + per-layer caches) equals recomputing the prompt
    and the tokens so far without a cache, in tokens and in every step's logits."""
    fam, model, samples, inputs, case = setup(family, method, modality, attn)
    applied = case.make()
    with applied.apply(model):
        cached = model.generate(**inputs, max_new_tokens=8, **GENERATE)
        uncached = model.generate(**inputs, max_new_tokens=8, use_cache=False, **GENERATE)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    plain = plain_generate(family, modality, attn, model, inputs)
    if case.changes:
        assert not torch.allclose(plain.logits[0], cached.logits[0], atol=1e-4)
    else:
        assert torch.equal(plain.sequences, cached.sequences)


@pytest.mark.support_matrix
@cells
def test_batch_equals_samples_one_by_one(family, method, modality, attn):
    """A left-padded batch of two different prompts gives each sample's own logits and greedy tokens."""
    fam, model, samples, inputs, case = setup(family, method, modality, attn)
    applied = case.make()
    with applied.apply(model):
        batch_logits = model(**inputs).logits[:, -1]
        batch_tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, -4:]
        for row in range(len(samples)):
            single = cached(("alone", family, modality, row), lambda: alone(fam, model, samples, row))
            torch.testing.assert_close(model(**single).logits[:, -1], batch_logits[row:row + 1], atol=1e-4, rtol=1e-4)
            assert model.generate(**single, max_new_tokens=4, do_sample=False)[0, -4:].tolist() == batch_tokens[row].tolist()


# --- family specifics ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llava"])
def test_identity_pre_llm_stage_rebuilds_the_exact_input(family):
    """Features taken apart into frames and put back by the adapter (newlines, positions, mm_encoder_outputs)
    give the plain model's logits: the rebuild path is exact when nothing is reduced."""
    fam = FAMILIES[family]
    model = model_for(family, "sdpa")
    inputs = fam.inputs(model, prompts(fam, "mixed"))
    plain = model(**inputs).logits
    with leanvlm.Compose(pre=[TokenMerge(keep=1.0)]).apply(model):
        torch.testing.assert_close(model(**inputs).logits, plain, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llava_onevision", "llava_next_video"])
def test_newline_tokens_are_protected_and_rebuilt_at_row_ends(family):
    fam = FAMILIES[family]
    model = model_for(family, "sdpa")
    inputs = fam.inputs(model, prompts(fam, "mixed"))
    adapter = get_adapter(model)
    newline = model.model.image_newline
    # unreduced: the protected positions are exactly where the model's packing puts its newline embedding
    embeds = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: embeds.append(kwargs["inputs_embeds"]), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    is_newline = (embeds[0] == newline).all(dim=-1)
    assert torch.equal(adapter.protected_placeholders(inputs, None), is_newline)
    assert int(is_newline.sum()) > 0
    # merged: every newline survives, each closes the row its preceding tokens came from
    items = [TokenMerge(0.25).reduce(item) for item in adapter.encode_visual(inputs, frozenset(), None)]
    rebuilt, _ = adapter.rebuild_inputs(inputs, items)
    protected = adapter.protected_placeholders(rebuilt, items)
    assert int(protected.sum()) == int(is_newline.sum())
    hires = items[1]  # sample 0: base tile, high-resolution grid, video
    features = rebuilt["mm_encoder_outputs"]["image"].pooler_output[0]
    packed = features[items[0].num_tokens:]
    flags = (packed == newline).all(dim=-1)
    rows = hires.origin[0] // hires.grid[1]
    assert int(flags.sum()) == hires.grid[0] and bool(flags[-1])
    row_of_slot = torch.cumsum(flags.long(), 0) - flags.long()  # newlines seen before each slot
    assert torch.equal(row_of_slot[~flags], rows)
    if getattr(fam, "video_newline", False):  # OneVision: the newline after the video survives too
        video_run = rebuilt["input_ids"][0] == VIDEO
        assert bool(protected[0][video_run.nonzero().max()])


def test_newlines_are_not_visual_for_in_llm_stages():
    """FastV halves the visual tokens; the OneVision newlines are neither counted nor dropped."""
    fam = FAMILIES["llava_onevision"]
    model = model_for("llava_onevision", "sdpa")
    samples = prompts(fam, "mixed")
    inputs = fam.inputs(model, samples)
    method = leanvlm.FastV(layer=1, keep=0.5)
    with method.apply(model):
        model(**inputs)
    for row, sample in enumerate(method.stats.samples):
        visual = sum(frame_tokens(fam, model, samples[row]))
        assert sample.layer_visual_tokens[0] == visual
        assert sample.layer_tokens[0] - sample.layer_tokens[2] == visual - half(visual)


def qwen_reference(model, inputs) -> torch.Tensor:
    """Qwen by hand: the model's own M-RoPE ids of the full input, then keep text + the even-indexed token of
    every frame with exactly those ids. -> last-token logits [1, V] (batch of one, no padding)."""
    mm = model.model
    positions, _ = mm.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                     image_grid_thw=inputs.get("image_grid_thw"), video_grid_thw=inputs.get("video_grid_thw"))
    ids = inputs["input_ids"]
    embeds = mm.get_input_embeddings()(ids)
    keep = torch.ones_like(ids[0], dtype=torch.bool)
    for kind, token, pixels, grid in (("image", IMAGE, "pixel_values", "image_grid_thw"),
                                      ("video", VIDEO, "pixel_values_videos", "video_grid_thw")):
        if inputs.get(grid) is None:
            continue
        fn = mm.get_image_features if kind == "image" else mm.get_video_features
        features = torch.cat(fn(inputs[pixels], inputs[grid], return_dict=True).pooler_output)
        slots = (ids[0] == token).nonzero().squeeze(1)
        embeds[0, slots] = features
        offset = 0
        for t, h, w in inputs[grid].tolist():
            per_frame = h * w // 4
            for f in range(t):
                frame_slots = slots[offset + f * per_frame: offset + (f + 1) * per_frame]
                keep[frame_slots[1::2]] = False  # drop odd raster indices
            offset += t * per_frame
    hidden = mm.language_model(inputs_embeds=embeds[:, keep], position_ids=positions[:, :, keep]).last_hidden_state
    return model.lm_head(hidden[:, -1])


@dataclass
class KeepEven(PreLLMStage):
    """Test stage: keep the even raster indices of every frame."""

    def reduce(self, item: VisualItem) -> VisualItem:
        return item.select([torch.arange(0, f.shape[0], 2) for f in item.frames])


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("attn", ATTN)
def test_qwen_surviving_tokens_keep_their_original_mrope_ids(family, attn):
    fam = FAMILIES[family]
    model = model_for(family, attn)
    inputs = fam.inputs(model, [[2, image(41, (8, 12)), 3, video(42, 4, (8, 8)), 5]])
    with torch.no_grad():
        expected = qwen_reference(model, inputs)
    method = leanvlm.Compose(pre=[KeepEven()])
    with method.apply(model):
        logits = model(**inputs).logits[:, -1]
        generated = model.generate(**inputs, max_new_tokens=1, **GENERATE)  # generate passes its own 4-row ids
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(generated.logits[0], expected, atol=1e-5, rtol=1e-5)
    assert method.stats.samples[0].visual_into_llm == (24 + 2 * 16) // 2


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_decode_positions_continue_from_the_original_ids(family):
    """A hand-written cached decode loop (position_ids=None: the model derives them from rope_deltas)
    equals generate (explicit ids) after a pre-LLM shrink and in-LLM pruning."""
    fam = FAMILIES[family]
    model = model_for(family, "sdpa")
    inputs = fam.inputs(model, [[2, image(43, (8, 8)), 3, video(44, 4, (8, 8)), 6]])
    method = leanvlm.AIM(merge_keep=0.5, l1=1, l2=3)
    seen = []  # position ids the language model receives: plain generate, then generate with the method
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"]), with_kwargs=True)
    plain_ids = model.generate(**inputs, max_new_tokens=4, **GENERATE)
    with method.apply(model):
        reference = model.generate(**inputs, max_new_tokens=4, **GENERATE)
    hook.remove()
    plain_rows = seen[:4]  # prefill + 3 cached steps each
    prefill, decode = seen[4], seen[5:]
    shrunk = prefill.shape[-1]
    assert prefill.shape[0] == 4 and torch.equal(prefill[0, 0], torch.arange(shrunk))  # text row: contiguous
    for step, (ids, plain) in enumerate(zip(decode, plain_rows[1:])):
        assert ids[0, 0, 0] == shrunk + step  # text row continues the shrunk prompt
        assert torch.equal(ids[1:], plain[1:])  # M-RoPE rows continue the ORIGINAL positions
    assert plain_ids.sequences.shape == reference.sequences.shape
    with method.apply(model):
        step = {k: v for k, v in inputs.items() if k != "attention_mask"}
        out = model(**step, use_cache=True)
        logits = [out.logits[:, -1]]
        prompt = inputs["input_ids"].shape[1]
        for i in range(3):
            # the tokens generate chose (its logits processors may differ from a raw argmax)
            token = reference.sequences[:, prompt + i:prompt + i + 1]
            out = model(input_ids=token, use_cache=True, **with_cache(model, cache_of(out)))
            logits.append(out.logits[:, -1])
    for got, want in zip(logits, reference.logits):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@dataclass
class RecordSignals(PreLLMStage):
    """Test stage: records the vision signals every item arrives with, keeps the top half by cls_attention."""

    needs: frozenset = frozenset({"cls_attention", "cls_similarity", "keys"})
    seen: list = None

    def reduce(self, item: VisualItem) -> VisualItem:
        self.seen.append(item)
        keep = []
        for f, frame in enumerate(item.frames):
            scores = item.signals["cls_attention"][f]
            keep.append(torch.sort(scores.topk(max(1, frame.shape[0] // 2)).indices).values)
        return item.select(keep)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llava"])
def test_vision_signals_per_frame_in_forward_and_generate(family):
    """Signals match every item's frames; generate (which encodes images, then videos, before the first
    forward) hands the stages the same signals as a plain forward."""
    fam = FAMILIES[family]
    model = model_for(family, "sdpa")
    inputs = fam.inputs(model, prompts(fam, "mixed"))
    forward_stage, generate_stage = RecordSignals(seen=[]), RecordSignals(seen=[])
    with leanvlm.Compose(pre=[forward_stage]).apply(model):
        model(**inputs)
    with leanvlm.Compose(pre=[generate_stage]).apply(model):
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert len(forward_stage.seen) == len(generate_stage.seen) > 0
    for a, b in zip(forward_stage.seen, generate_stage.seen):
        assert a.kind == b.kind
        assert len({f.shape[0] for f in a.frames}) == 1
        for name in ("cls_attention", "cls_similarity"):
            assert a.signals[name].shape == (len(a.frames), a.frames[0].shape[0])
            torch.testing.assert_close(a.signals[name], b.signals[name])
        assert a.signals["keys"].shape[:2] == (len(a.frames), a.frames[0].shape[0])
        torch.testing.assert_close(a.signals["keys"], b.signals["keys"])


def test_qwen25_window_order_is_undone():
    """The merger applied to the captured last-block output, put back in raster order, gives the tower's
    own (raster-ordered) features: the un-permutation of Qwen2.5-VL's window layout is right."""
    model = model_for("qwen2_5_vl", "sdpa")
    fam = FAMILIES["qwen2_5_vl"]
    inputs = fam.inputs(model, [[1, image(45, (12, 8)), 1, image(46, (8, 8)), 2]])
    adapter = get_adapter(model)
    probe = adapter.install_vision_probe()
    try:
        with torch.no_grad():
            features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
        grids = [tuple(g) for g in inputs["image_grid_thw"].tolist()]
        restored = restore_unit_order(probe.capture()[2], 4, adapter._window_order(grids))
    finally:
        probe.remove()
    with torch.no_grad():
        merged = model.model.visual.merger(restored)
    torch.testing.assert_close(merged, torch.cat(features.pooler_output))


@pytest.mark.parametrize("method", ["fastv", "aim"])
def test_onevision_several_images_in_a_prompt(method):
    """Several images in a prompt are not tiled (`batch_num_images`): each is one grid + one newline; a
    prompt with a single image in the same batch is still tiled."""
    fam = FAMILIES["llava_onevision"]
    model = model_for("llava_onevision", "sdpa")
    samples = [[2, image(51, (30, 52)), 1, image(52, (52, 30)), 4], [3, image(53, (30, 52)), 5]]
    inputs = fam.inputs(model, samples)
    assert inputs["batch_num_images"].tolist() == [2, 1]
    case = METHOD_BY_NAME[method]
    applied = case.make()
    with applied.apply(model):
        batch_logits = model(**inputs).logits[:, -1]
        stats = applied.stats
        cached = model.generate(**inputs, max_new_tokens=6, **GENERATE)
        uncached = model.generate(**inputs, max_new_tokens=6, use_cache=False, **GENERATE)
        for row in range(2):
            single = alone(fam, model, samples, row)
            torch.testing.assert_close(model(**single).logits[:, -1], batch_logits[row:row + 1], atol=1e-4, rtol=1e-4)
    assert torch.equal(cached.sequences, uncached.sequences)
    side = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    frames = [side, side]
    assert stats.samples[0].visual_in == sum(frames)
    assert stats.samples[0].layer_visual_tokens == case.layer_visual(frames, LAYERS)

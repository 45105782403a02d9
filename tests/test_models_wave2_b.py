"""Model coverage, wave 2 (b): Qwen3-VL, Qwen3-VL-MoE, Idefics3, SmolVLM on tiny random-weight models.

The support-matrix checks are tests/test_models.py's (same names, same assertions, the same `METHODS`),
run on the families of tests/tiny_families_b.py. By default a fast subset runs (`_fast`: every method on
Qwen3-VL's mixed batch and Idefics3's images under sdpa, keep_all on the MoE sibling and under eager, aim
on SmolVLM); `LEANVLM_FULL_MATRIX=1` runs every family x method x modality x attention cell (432 tests,
about 3 min on 2 cores; `scripts/support_matrix.py` and CI set it). Family-specific tests below check
what the generic ones cannot see: DeepStack features of the kept tokens (pre-LLM and in-LLM, against
hand-written references built on the model's own text model), the original M-RoPE ids with timestamped
video frames, per-tile shrinking with row/column tokens intact, and the pixel-shuffled vision signals.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

import leanvlm
from leanvlm.methods.aim import TokenMerge
from leanvlm.methods.base import PreLLMStage
from leanvlm.models import get_adapter, supported_models
from leanvlm.runtime.stages import LLMStage, Selection
from leanvlm.runtime.visual import VisualItem
from test_models import ATTN, GENERATE, LAYERS, METHOD_BY_NAME, METHODS, RecordSignals, cached, half
from tiny_families import IMAGE, VIDEO, Visual, image, video
from tiny_families_b import FAKE_AROUND, FAMILIES_B, GLOBAL_IMG, ROW_COL, Family

FULL = os.environ.get("LEANVLM_FULL_MATRIX") == "1"
QWEN = ("qwen3_vl", "qwen3_vl_moe")


def modalities(family: Family) -> list[str]:
    return ["image"] + (["video"] if family.videos else []) + (["mixed"] if family.mixed else [])


def prompts(family: Family, modality: str) -> list[list]:
    """Two samples with different text and visual inputs (so the batch is left-padded)."""
    if family.name not in QWEN:  # (rows, cols) tiles: a 2 x 2 split + global tile, and a global tile only
        return [[3, image(11, (2, 2)), 5], [1, image(12, (1, 1)), 8]]
    if modality == "image":
        return [[3, image(11, (8, 12)), 5], [1, image(12, (12, 8)), 8]]
    if modality == "video":
        return [[3, video(21, 4, (8, 8)), 5], [2, video(22, 4, (8, 8)), 7]]
    return [[2, image(31, (8, 12)), 2, video(32, 4, (8, 8)), 4], [4, video(33, 4, (8, 8)), 6]]


def model_for(family: str, attn: str) -> torch.nn.Module:
    return cached(("model", family, attn), lambda: FAMILIES_B[family].build(attn, layers=LAYERS))


def frame_tokens(family: Family, model, prompt: list) -> list[int]:
    """Visual tokens of every frame (Qwen: temporal patch; Idefics3: tile) of a prompt."""
    frames = []
    for part in prompt:
        if isinstance(part, Visual):
            if family.name in QWEN:
                frames += [part.size[0] * part.size[1] // 4] * (1 if part.kind == "image" else part.frames // 2)
            else:
                frames += [model.model.image_seq_len] * family.tiles(part)
    return frames


def _fast(family: str, method: str, modality: str, attn: str) -> bool:
    """The default subset: every method on Qwen3-VL (mixed batch) and Idefics3 under sdpa; the code paths
    their siblings share once (MoE: keep_all, SmolVLM: aim), and eager once (Qwen3-VL keep_all)."""
    if family in ("qwen3_vl", "idefics3") and modality == modalities(FAMILIES_B[family])[-1] and attn == "sdpa":
        return True
    siblings = {"qwen3_vl": ("keep_all",), "qwen3_vl_moe": ("keep_all",), "smolvlm": ("aim",)}
    return method in siblings.get(family, ()) and modality == modalities(FAMILIES_B[family])[-1] and \
        (attn == "sdpa" or family == "qwen3_vl")


CELLS = [(family, method.name, modality, attn)
         for family, fam in FAMILIES_B.items() for modality in modalities(fam) for method in METHODS for attn in ATTN
         if FULL or (_fast(family, method.name, modality, attn) and not method.full_only)]
cells = pytest.mark.parametrize("family, method, modality, attn", CELLS)


def setup(family: str, method: str, modality: str, attn: str):
    fam = FAMILIES_B[family]
    model = model_for(family, attn)
    samples = prompts(fam, modality)
    inputs = cached(("inputs", family, modality), lambda: fam.inputs(model, samples))
    return fam, model, samples, inputs, METHOD_BY_NAME[method]


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


# --- the support matrix (the checks of tests/test_models.py) ----------------------------------------------
@pytest.mark.support_matrix
@cells
def test_logits_and_token_counts(family, method, modality, attn):
    fam, model, samples, inputs, case = setup(family, method, modality, attn)
    plain = cached(("logits", family, modality, attn), lambda: model(**inputs).logits)
    applied = case.make()
    with applied.apply(model):
        logits = model(**inputs).logits
    if case.changes:
        assert not torch.allclose(logits[:, -1], plain[:, -1], atol=1e-4)
    else:
        torch.testing.assert_close(logits, plain, atol=1e-5, rtol=0)
    for row, sample in enumerate(applied.stats.samples):
        frames = frame_tokens(fam, model, samples[row])
        assert sample.visual_in == sum(frames)
        if case.layer_visual is not None:
            assert sample.layer_visual_tokens == case.layer_visual(frames, LAYERS)
        else:
            counts = sample.layer_visual_tokens
            assert counts[0] <= sum(frames) and all(b <= a for a, b in zip(counts, counts[1:]))


@pytest.mark.support_matrix
@cells
def test_cached_decode_equals_uncached(family, method, modality, attn):
    fam, model, samples, inputs, case = setup(family, method, modality, attn)
    applied = case.make()
    with applied.apply(model):
        with_cache = model.generate(**inputs, max_new_tokens=8, **GENERATE)
        without = model.generate(**inputs, max_new_tokens=8, use_cache=False, **GENERATE)
    assert torch.equal(with_cache.sequences, without.sequences)
    for a, b in zip(with_cache.logits, without.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    plain = cached(("generate", family, modality, attn), lambda: model.generate(**inputs, max_new_tokens=8, **GENERATE))
    if case.changes:
        assert not torch.allclose(plain.logits[0], with_cache.logits[0], atol=1e-4)
    else:
        assert torch.equal(plain.sequences, with_cache.sequences)


@pytest.mark.support_matrix
@cells
def test_batch_equals_samples_one_by_one(family, method, modality, attn):
    fam, model, samples, inputs, case = setup(family, method, modality, attn)
    applied = case.make()
    with applied.apply(model):
        batch_logits = model(**inputs).logits[:, -1]
        batch_tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, -4:]
        for row in range(len(samples)):
            single = cached(("alone", family, modality, row), lambda: alone(fam, model, samples, row))
            torch.testing.assert_close(model(**single).logits[:, -1], batch_logits[row:row + 1], atol=1e-4, rtol=1e-4)
            assert model.generate(**single, max_new_tokens=4, do_sample=False)[0, -4:].tolist() == batch_tokens[row].tolist()


# --- every family ----------------------------------------------------------------------------------------
def test_families_are_supported():
    for fam in FAMILIES_B.values():
        assert fam.model_class.__name__ in supported_models()


@pytest.mark.parametrize("family", list(FAMILIES_B))
def test_identity_pre_llm_stage_rebuilds_the_exact_input(family):
    """Features taken apart into items and put back (per-frame / per-tile shrink, DeepStack, positions)
    give the plain model's logits bit for bit when nothing is reduced."""
    fam = FAMILIES_B[family]
    model = model_for(family, "sdpa")
    inputs = fam.inputs(model, prompts(fam, modalities(fam)[-1]))
    plain = model(**inputs).logits
    with leanvlm.Compose(pre=[TokenMerge(keep=1.0)]).apply(model):
        torch.testing.assert_close(model(**inputs).logits, plain, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["qwen3_vl", "idefics3"])  # the siblings share the adapter and its hooks
def test_model_restored_after_exit_even_after_an_error(family):
    fam = FAMILIES_B[family]
    model = model_for(family, "sdpa")
    inputs = fam.inputs(model, prompts(fam, "image"))
    plain = model(**inputs).logits

    def hooks() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    before = hooks()
    with pytest.raises(RuntimeError, match="inside"):
        with leanvlm.AIM(merge_keep=0.5, l1=0, l2=2).apply(model):
            assert hooks() > before
            model(**inputs)
            raise RuntimeError("inside the block")
    assert hooks() == before and "generate" not in vars(model)
    torch.testing.assert_close(model(**inputs).logits, plain, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["qwen3_vl", "idefics3", "smolvlm"])  # the MoE sibling has Qwen3-VL's tower
def test_vision_signals_per_frame_in_forward_and_generate(family):
    """Signals match every item's frames; generate (which pre-encodes the pixels) hands the stages the same
    signals as a plain forward."""
    fam = FAMILIES_B[family]
    model = model_for(family, "sdpa")
    inputs = fam.inputs(model, prompts(fam, modalities(fam)[-1]))
    forward_stage, generate_stage = RecordSignals(seen=[]), RecordSignals(seen=[])
    with leanvlm.Compose(pre=[forward_stage]).apply(model):
        model(**inputs)
    with leanvlm.Compose(pre=[generate_stage]).apply(model):
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert len(forward_stage.seen) == len(generate_stage.seen) > 0
    for a, b in zip(forward_stage.seen, generate_stage.seen):
        assert a.kind == b.kind
        for name in ("cls_attention", "cls_similarity"):
            assert a.signals[name].shape == (len(a.frames), a.frames[0].shape[0])
            torch.testing.assert_close(a.signals[name], b.signals[name])
        assert a.signals["keys"].shape[:2] == (len(a.frames), a.frames[0].shape[0])
        torch.testing.assert_close(a.signals["keys"], b.signals["keys"])


# --- Qwen3-VL: DeepStack, M-RoPE, timestamps -------------------------------------------------------------
def _causal(length: int) -> torch.Tensor:
    return torch.full((length, length), float("-inf")).triu(1)[None, None]


def qwen3_reference(model, inputs, pre_keep: torch.Tensor | None, llm_keep: torch.Tensor | None,
                    llm_layer: int = 0) -> torch.Tensor:
    """Qwen3-VL by hand, batch of one: the model's own features, DeepStack features and M-RoPE ids of the
    full input; keep the tokens `pre_keep` [L] before the LLM and `llm_keep` [L'] after decoder layer
    `llm_layer`, each with its original ids, and inject DeepStack level l after layer l into the visual
    tokens still present. -> last-token logits [1, V]."""
    mm, text = model.model, model.model.language_model
    positions, _ = mm.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                     image_grid_thw=inputs.get("image_grid_thw"), video_grid_thw=inputs.get("video_grid_thw"))
    ids = inputs["input_ids"]
    embeds = mm.get_input_embeddings()(ids)
    visual = torch.isin(ids[0], torch.tensor([IMAGE, VIDEO]))
    deep = None
    for token, pixels, grid in ((IMAGE, "pixel_values", "image_grid_thw"), (VIDEO, "pixel_values_videos", "video_grid_thw")):
        if inputs.get(grid) is None:
            continue
        out = mm.get_image_features(inputs[pixels], inputs[grid], return_dict=True)
        embeds[0, ids[0] == token] = torch.cat(out.pooler_output)
        levels = [torch.cat(level) for level in out.deepstack_features]
        slots = (ids[0] == token)[visual]  # this modality's rows among the visual tokens
        if deep is None:
            deep = [torch.zeros(int(visual.sum()), level.shape[-1]) for level in levels]
        for full, level in zip(deep, levels):
            full[slots] = level
    keep = torch.ones_like(visual) if pre_keep is None else pre_keep
    hidden, pos, vis = embeds[:, keep], positions[:, :, keep], visual[keep]
    deep = [level[keep[visual]] for level in deep]
    cos, sin = text.rotary_emb(hidden, pos)
    for layer_index, layer in enumerate(text.layers):
        hidden = layer(hidden, position_embeddings=(cos, sin), attention_mask=_causal(hidden.shape[1]),
                       position_ids=None)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        if layer_index < len(deep):
            hidden = hidden.clone()
            hidden[0, vis] = hidden[0, vis] + deep[layer_index]
        if layer_index == llm_layer and llm_keep is not None:
            hidden, cos, sin = hidden[:, llm_keep], cos[:, llm_keep], sin[:, llm_keep]
            deep = [level[llm_keep[vis]] for level in deep]
            vis = vis[llm_keep]
    return model.lm_head(text.norm(hidden)[:, -1])


@dataclass
class KeepEven(PreLLMStage):
    """Test stage: keep the even raster indices of every frame."""

    def reduce(self, item: VisualItem) -> VisualItem:
        return item.select([torch.arange(0, f.shape[0], 2) for f in item.frames])


@dataclass
class DropOddVisualAfter(LLMStage):
    """Test stage: after decoder layer `layer`, drop every odd-ranked visual token still present."""

    layer: int = 0

    def layers(self, num_layers: int) -> list[int]:
        return [self.layer]

    def select(self, ctx) -> Selection:
        rank = torch.cumsum(ctx.visual.long(), dim=1) - 1
        even = ctx.visual & (rank % 2 == 0)
        return Selection(even.float(), ctx.visual, even.sum(dim=1))


def _single_qwen_prompt(model, fam):
    return fam.inputs(model, [[2, image(41, (8, 12)), 3, video(42, 4, (8, 8)), 5]])


def _even_visual(ids: torch.Tensor) -> torch.Tensor:
    """[L] bool: text + the even raster index of every frame (Qwen frames: 24-token image, 16-token video frames)."""
    keep = torch.ones_like(ids, dtype=torch.bool)
    for token, per_frame in ((IMAGE, 24), (VIDEO, 16)):
        slots = (ids == token).nonzero().squeeze(1)
        keep[slots[(torch.arange(slots.numel()) % per_frame) % 2 == 1]] = False
    return keep


@pytest.mark.parametrize("family", QWEN)
@pytest.mark.parametrize("attn", ATTN)
def test_qwen3_pre_llm_reduction_keeps_deepstack_and_mrope_of_the_survivors(family, attn):
    """A pre-LLM prune feeds the LLM the kept tokens with their own DeepStack features and original M-RoPE ids,
    each video frame's survivors after its own timestamp (forward, and generate's 4-row position ids)."""
    fam = FAMILIES_B[family]
    model = model_for(family, attn)
    inputs = _single_qwen_prompt(model, fam)
    with torch.no_grad():
        expected = qwen3_reference(model, inputs, _even_visual(inputs["input_ids"][0]), None)
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"]), with_kwargs=True)
    method = leanvlm.Compose(pre=[KeepEven()])
    try:
        with method.apply(model):
            logits = model(**inputs).logits[:, -1]
            generated = model.generate(**inputs, max_new_tokens=1, **GENERATE)
    finally:
        hook.remove()
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(generated.logits[0], expected, atol=1e-5, rtol=1e-5)
    assert method.stats.samples[0].visual_into_llm == (24 + 2 * 16) // 2
    # each frame keeps its own placeholder run: 8 video placeholders between every timestamp and its end token
    ids = inputs["input_ids"][0]
    kept_ids = ids[_even_visual(ids)]
    assert seen[0].shape[1] == kept_ids.numel()


@pytest.mark.parametrize("family", QWEN)
@pytest.mark.parametrize("layer", [0, 1])
def test_qwen3_in_llm_drop_before_the_last_deepstack_layer_drops_its_features(family, layer):
    """Dropping after layer 0 (DeepStack levels go in after layers 0 and 1) must also drop the dropped
    tokens' level-1 features; after layer 1 nothing is left to inject. Matches the hand-written model."""
    fam = FAMILIES_B[family]
    model = model_for(family, "eager")
    inputs = _single_qwen_prompt(model, fam)
    ids = inputs["input_ids"][0]
    visual = torch.isin(ids, torch.tensor([IMAGE, VIDEO]))
    rank = torch.cumsum(visual.long(), 0) - 1
    keep = ~visual | (rank % 2 == 0)
    with torch.no_grad():
        expected = qwen3_reference(model, inputs, None, keep, llm_layer=layer)
        plain = model(**inputs).logits[:, -1]
    method = leanvlm.Compose(llm=[DropOddVisualAfter(layer)])
    with method.apply(model):
        logits = model(**inputs).logits[:, -1]
        cached_run = model.generate(**inputs, max_new_tokens=4, **GENERATE)
        uncached_run = model.generate(**inputs, max_new_tokens=4, use_cache=False, **GENERATE)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits, plain, atol=1e-4)
    assert torch.equal(cached_run.sequences, uncached_run.sequences)
    assert method.stats.samples[0].layer_visual_tokens == [56] * (layer + 1) + [28] * (LAYERS - layer - 1)


def test_qwen3_merged_tokens_take_the_mean_deepstack_of_their_patches():
    """After a merge, the DeepStack features handed to the model are, per output token, the mean over the
    original patches that ended in it (`groups`)."""
    fam = FAMILIES_B["qwen3_vl"]
    model = model_for("qwen3_vl", "sdpa")
    inputs = _single_qwen_prompt(model, fam)
    adapter = get_adapter(model)
    items = [TokenMerge(0.5).reduce(item) for item in adapter.encode_visual(inputs, frozenset(), None)]
    rebuilt, _ = adapter.rebuild_inputs(inputs, items)
    image_out = rebuilt["mm_encoder_outputs"]["image"]
    with torch.no_grad():
        original = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    groups = items[0].groups[0]
    for level, full in zip(image_out.deepstack_features, original.deepstack_features):
        got, source = level[0], full[0]
        assert got.shape[0] == items[0].num_tokens
        for token in range(got.shape[0]):
            torch.testing.assert_close(got[token], source[groups == token].mean(dim=0))


# --- Idefics3 / SmolVLM: tiles, row/column tokens, pixel shuffle ---------------------------------------------
SEPARATORS = (FAKE_AROUND, GLOBAL_IMG, ROW_COL)


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_idefics3_tiles_shrink_in_place_and_row_column_tokens_survive(family):
    """A pre-LLM prune keeps every separator text token, each tile's survivors stay in that tile's own run,
    and the logits equal the model fed exactly those kept tokens by hand."""
    fam = FAMILIES_B[family]
    model = model_for(family, "sdpa")
    inputs = fam.inputs(model, [[2, image(61, (2, 2)), 4]])
    ids = inputs["input_ids"][0]
    per_tile = model.model.image_seq_len
    slots = (ids == IMAGE).nonzero().squeeze(1)
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[slots[(torch.arange(slots.numel()) % per_tile) % 2 == 1]] = False
    with torch.no_grad():
        pooled = model.model.get_image_features(inputs["pixel_values"], return_dict=True).pooler_output
        features = torch.cat(list(pooled)).flatten(0, -2)  # per sample (newer transformers) or per tile
        embeds = model.model.get_input_embeddings()(ids[None])
        embeds[0, slots] = features
        hidden = model.model.text_model(inputs_embeds=embeds[:, keep]).last_hidden_state
        expected = model.lm_head(hidden[:, -1])
    seen = []
    hook = model.model.text_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"]), with_kwargs=True)
    try:
        with leanvlm.Compose(pre=[KeepEven()]).apply(model) as applied:
            logits = model(**inputs).logits[:, -1]
    finally:
        hook.remove()
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert applied.stats.samples[0].visual_into_llm == 5 * ((per_tile + 1) // 2)  # 2 x 2 tiles + global, even of 9
    torch.testing.assert_close(seen[0], embeds[:, keep])  # separators in place, every tile's survivors in its run
    for token in SEPARATORS:
        assert int((ids[keep] == token).sum()) == int((ids == token).sum())


def test_idefics3_separators_are_not_visual_for_in_llm_stages():
    """FastV halves the image tokens; row/column, global-image and fake tokens are text, never dropped."""
    fam = FAMILIES_B["idefics3"]
    model = model_for("idefics3", "sdpa")
    samples = prompts(fam, "image")
    inputs = fam.inputs(model, samples)
    method = leanvlm.FastV(layer=1, keep=0.5)
    with method.apply(model):
        model(**inputs)
    for row, sample in enumerate(method.stats.samples):
        visual = sum(frame_tokens(fam, model, samples[row]))
        assert sample.layer_visual_tokens[0] == visual
        assert sample.layer_tokens[0] - sample.layer_tokens[2] == visual - half(visual)


def test_idefics3_signals_fold_each_tokens_patches():
    """Per-token signals are the pixel-shuffle blocks of the per-patch ones: attention summed, keys averaged
    over the s x s patches each token is made of."""
    from leanvlm.models.vision import vision_signals

    fam = FAMILIES_B["idefics3"]
    model = model_for("idefics3", "sdpa")
    inputs = fam.inputs(model, [[1, image(62, (1, 2)), 1]])
    adapter = get_adapter(model)
    probe = adapter.install_vision_probe()
    try:
        items = adapter.encode_visual(inputs, frozenset({"cls_attention", "keys"}), probe)
        patches = vision_signals(probe, frozenset({"cls_attention", "keys"}), has_cls=False, prefix=0)
    finally:
        probe.remove()
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size  # 6 patches a side
    assert len(items) == 3
    for tile, item in enumerate(items):
        attention = patches["cls_attention"][tile].view(side // 2, 2, side // 2, 2).sum(dim=(1, 3)).flatten()
        keys = patches["keys"][tile].view(side // 2, 2, side // 2, 2, -1).mean(dim=(1, 3)).flatten(0, 1)
        torch.testing.assert_close(item.signals["cls_attention"][0], attention)
        torch.testing.assert_close(item.signals["keys"][0], keys)


# --- FLOPs presets ------------------------------------------------------------------------------------------
def test_flops_presets_match_the_published_configs_read_by_preset_from_config():
    """qwen3-vl-8b and smolvlm-2.2b (numbers written in flops.py) equal what `preset_from_config` reads from
    the published config.json fields (Qwen3-VL-8B-Instruct at 512 px, SmolVLM2-2.2B-Instruct)."""
    from transformers import Qwen3VLConfig, SmolVLMConfig

    from leanvlm import flops

    qwen = Qwen3VLConfig(
        vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=4096,
                           deepstack_visual_indexes=[8, 16, 24]),
        text_config=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=151936))
    smol = SmolVLMConfig(
        vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                           patch_size=14, image_size=384),
        text_config=dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=49280), scale_factor=3)
    for name, config, size in (("qwen3-vl-8b", qwen, 512), ("smolvlm-2.2b", smol, None)):
        read, preset = flops.preset_from_config(config, image_size=size), flops.PRESETS[name]
        assert (read.llm, read.vision, read.image_tokens) == (preset.llm, preset.vision, preset.image_tokens)
    qwen3 = flops.PRESETS["qwen3-vl-8b"].vision
    assert qwen3.projector_copies == 4 and qwen3.window_tokens == 0 and not qwen3.gated_mlp
    # the three DeepStack mergers cost three more merger passes
    one_merger = flops.vision_flops(1, flops.VisionShape(**{**qwen3.__dict__, "projector_copies": 1}))
    merger = 2.0 * 256 * (4608 * 4608 + 4608 * 4096)
    assert flops.vision_flops(1, qwen3) - one_merger == 3 * merger

"""Analytic FLOPs calculator: the published figures, config reading, and structural properties."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaNextVideoConfig,
    LlavaOnevisionConfig,
    Qwen2_5_VLConfig,
    Qwen2Config,
    Qwen2VLConfig,
    SiglipVisionConfig,
)

from leanvlm.flops import (
    PRESETS,
    LLMShape,
    VisionShape,
    Workload,
    aim_tokens_per_layer,
    fastv_tokens_per_layer,
    flops,
    importance_flops,
    kept_count,
    layer_flops,
    llm_prefill_flops,
    merge_flops,
    preset_from_config,
    shape_from_config,
    vision_flops,
)
from leanvlm.ops.schedule import progressive_keep

OV7B = PRESETS["llava-onevision-7b"]


def within(value: float, published: float, rel: float = 0.01) -> bool:
    return abs(value - published) <= rel * published


# ------------------------------------------------------------------ published figures (SPEC 1c, AIM paper)
def test_llava_onevision_7b_base_32_frames_is_99_63_tflops():
    report = flops("llava-onevision-7b", frames=32)
    assert report.visual_tokens == 32 * 196 and report.text_tokens == 100
    assert within(report.base_tflops, 99.63)


def test_aim_default_is_14_76_tflops_under_the_papers_accounting():
    report = flops("llava-onevision-7b", frames=32, method="aim", accounting="paper")
    assert within(report.method_tflops, 14.76)
    assert within(report.ratio, 6.75)


def test_merge_only_25_percent_is_22_90_tflops():
    report = flops("llava-onevision-7b", frames=32, method="merge", merge_keep=0.25)
    assert report.per_layer_tokens == [32 * 49 + 100] * 28
    assert within(report.method_tflops, 22.90)


def test_llava_1_5_7b_image_is_8_18_tflops():
    report = flops("llava-1.5-7b", image=True)
    assert report.visual_tokens == 576 and report.text_tokens == 40
    assert within(report.base_tflops, 8.18)


def test_lm_head_for_every_token_would_miss_the_published_base():
    tokens = [32 * 196 + 100] * 28
    per_token_head = llm_prefill_flops(tokens, OV7B.llm, lm_head_tokens=32 * 196 + 100) / 1e12
    assert not within(per_token_head, 99.63)


def test_runtime_accounting_is_the_paper_schedule_one_layer_later():
    runtime = aim_tokens_per_layer(196, 32, 100, 28, accounting="runtime")
    paper = aim_tokens_per_layer(196, 32, 100, 28, accounting="paper")
    assert runtime == [paper[0]] + paper[:-1]
    # SPEC 1b: layers 0..l1 see all, layer l1 + 1 sees keep(l1), layers >= l2 none.
    visual = 32 * 49
    assert runtime[:15] == [100 + visual] * 15
    assert runtime[15] == 100 + round(visual * progressive_keep(14, 14, 22))
    assert runtime[22:] == [100] * 6
    assert flops("llava-onevision-7b", frames=32, method="aim").method_tflops > 14.76 * 1.01


# ------------------------------------------------------------------ formulas on hand-checkable cases
def test_layer_flops_matches_spec_formula_on_small_numbers():
    shape = LLMShape(hidden=2, kv_dim=1, intermediate=3, heads=1, layers=1, vocab=5)
    # 2n(2d^2 + 2 d dkv + 3 d m) + 4 n^2 d + 5 H n^2 + 18 n d with n=2: 120 + 32 + 20 + 72
    assert layer_flops(2, shape) == 244
    assert layer_flops(0, shape) == 0
    # causal: the attention terms over n (n + 1) / 2 = 3 pairs instead of 4: 120 + 24 + 15 + 72
    assert layer_flops(2, shape, causal=True) == 231
    assert layer_flops(1, shape, causal=True) == layer_flops(1, shape)  # one token: one pair either way


def test_llm_prefill_adds_lm_head_once_and_checks_length():
    shape = LLMShape(hidden=2, kv_dim=1, intermediate=3, heads=1, layers=2, vocab=5)
    assert llm_prefill_flops([2, 0], shape) == 244 + 2 * 2 * 5
    with pytest.raises(ValueError):
        llm_prefill_flops([2], shape)


def test_merge_flops_small_case_and_identity():
    # T=4, C=1, one pass removing 2: norm 12 + cosine 2*2*2 + argmax 4 + averaging (2 + 2)
    assert merge_flops(4, 1, [2]) == 28
    assert merge_flops(196, 3584, []) == 0


def test_vision_flops_plain_vit_small_case():
    shape = VisionShape(hidden=2, intermediate=3, heads=1, layers=1, patches=2, patch_dim=1,
                        projector=(2, 1), projector_tokens=2)
    # patch embed 2*2*1*2 = 8; layer 2*2*(16 + 12) + 4*4*2 + 5*4 + 18*4 = 236; projector 2*2*2*1 = 8
    assert vision_flops(1, shape) == 252
    assert vision_flops(3, shape) == 3 * 252


def test_windowed_attention_is_cheaper_than_global():
    qwen25 = PRESETS["qwen2.5-vl-7b"].vision
    global_only = VisionShape(**{**qwen25.__dict__, "window_tokens": 0, "full_attention_layers": ()})
    assert vision_flops(1, qwen25) < vision_flops(1, global_only)


def test_importance_kinds_order_and_text_needs_queries():
    shape = OV7B.llm
    last = importance_flops(1668, shape, "last_token")
    text = importance_flops(1668, shape, "text", n_queries=100)
    pagerank = importance_flops(1668, shape, "pagerank")
    assert last < text < pagerank
    assert importance_flops(1668, shape, iterations=10) > pagerank
    with pytest.raises(ValueError):
        importance_flops(10, shape, "text")


# ------------------------------------------------------------------ token schedules
def test_kept_count_rounding_rules():
    assert kept_count(5, 0.5) == 2  # half to even, as torch.round in methods.base.keep_count
    assert kept_count(7, 0.5) == 4
    assert kept_count(3, 0.01) == 1  # a positive fraction keeps at least one
    assert kept_count(3, 0.0) == 0
    assert kept_count(0, 0.5) == 0


def test_fastv_layers_up_to_k_see_everything():
    tokens = fastv_tokens_per_layer(576, 40, 32, layer=2, keep=0.5)
    assert tokens[:3] == [616] * 3 and tokens[3:] == [40 + 288] * 29
    with pytest.raises(ValueError):
        fastv_tokens_per_layer(576, 40, 32, layer=32)


def test_aim_without_pruning_or_merging_is_the_base():
    assert aim_tokens_per_layer(196, 4, 10, 28, merge_keep=1.0, prune=False) == [10 + 4 * 196] * 28


@settings(max_examples=60, deadline=None)
@given(
    per_frame=st.integers(1, 800),
    frames=st.integers(1, 64),
    text=st.integers(0, 300),
    layers=st.integers(2, 40),
    merge_keep=st.floats(0.05, 1.0),
    accounting=st.sampled_from(["runtime", "paper"]),
)
def test_aim_tokens_never_increase_and_never_exceed_base(per_frame, frames, text, layers, merge_keep, accounting):
    tokens = aim_tokens_per_layer(per_frame, frames, text, layers, merge_keep=merge_keep, accounting=accounting)
    assert len(tokens) == layers
    assert all(a >= b for a, b in zip(tokens, tokens[1:]))
    assert text <= tokens[-1] and tokens[0] <= text + per_frame * frames


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 20000), min_size=4, max_size=4),
    extra=st.lists(st.integers(0, 500), min_size=4, max_size=4),
)
def test_prefill_flops_monotone_in_every_layers_tokens(tokens, extra):
    shape = LLMShape(hidden=64, kv_dim=16, intermediate=128, heads=4, layers=4, vocab=100)
    more = [n + e for n, e in zip(tokens, extra)]
    assert llm_prefill_flops(more, shape) >= llm_prefill_flops(tokens, shape)
    if any(extra):
        assert llm_prefill_flops(more, shape) > llm_prefill_flops(tokens, shape)


# ------------------------------------------------------------------ config reading (tiny configs, each family)
TINY_LLAMA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=300)
TINY_QWEN2 = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=5, num_attention_heads=6,
                  num_key_value_heads=3, vocab_size=200)
TINY_VIT = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, patch_size=14)


def test_llm_shape_from_bare_text_configs():
    assert LLMShape.from_config(LlamaConfig(**TINY_LLAMA)) == LLMShape(64, 2 * 8, 96, 8, 3, 300)
    assert LLMShape.from_config(Qwen2Config(**TINY_QWEN2)) == LLMShape(48, 3 * 8, 80, 6, 5, 200)
    assert LLMShape.from_config({"model_type": "qwen2", **TINY_QWEN2}) == LLMShape(48, 24, 80, 6, 5, 200)


def test_llava_config_clip_drops_cls_for_projector():
    vision = CLIPVisionConfig(**TINY_VIT, image_size=56)
    config = LlavaConfig(text_config=LlamaConfig(**TINY_LLAMA), vision_config=vision)
    llm, vis = shape_from_config(config)
    assert llm == LLMShape(64, 16, 96, 8, 3, 300)
    assert vis == VisionShape(hidden=32, intermediate=40, heads=4, layers=2, patches=16, cls_tokens=1, patch_dim=588,
                              projector=(32, 64, 64), projector_tokens=16)
    assert preset_from_config(config).image_tokens == 16 and preset_from_config(config).frame_tokens is None
    # the same config as a config.json dict
    assert shape_from_config(config.to_dict()) == (llm, vis)


def test_llava_onevision_config_siglip_and_pooled_frames():
    vision = SiglipVisionConfig(**TINY_VIT, image_size=378)
    config = LlavaOnevisionConfig(text_config=Qwen2Config(**TINY_QWEN2), vision_config=vision)
    preset = preset_from_config(config)
    assert preset.vision.cls_tokens == 0 and preset.vision.patches == 27 * 27
    assert preset.image_tokens == 729 and preset.frame_tokens == 14 * 14
    assert preset.llm == LLMShape(48, 24, 80, 6, 5, 200)


def test_llava_next_video_config_average_pool():
    config = LlavaNextVideoConfig(text_config=LlamaConfig(**TINY_LLAMA))
    assert preset_from_config(config).frame_tokens == 12 * 12  # 24x24 CLIP grid, stride 2, floor


def test_qwen2_vl_config_reads_embed_dim_depth_num_heads_mlp_ratio():
    vision = dict(depth=3, embed_dim=32, num_heads=4, mlp_ratio=2, hidden_size=48)
    config = Qwen2VLConfig(text_config=TINY_QWEN2, vision_config=vision)
    llm, vis = shape_from_config(config, image_size=56)
    assert llm == LLMShape(48, 24, 80, 6, 5, 200)
    assert (vis.hidden, vis.intermediate, vis.heads, vis.layers, vis.gated_mlp) == (32, 64, 4, 3, False)
    assert vis.patches == 16 and vis.projector_tokens == 4 and vis.projector == (128, 128, 48)
    assert vis.patch_dim == 3 * 2 * 14 * 14
    preset = preset_from_config(config, image_size=56)
    assert preset.frames_per_group == 2 and preset.frame_tokens == 4


def test_qwen2_5_vl_config_reads_hidden_intermediate_depth_and_windows():
    config = Qwen2_5_VLConfig(text_config=TINY_QWEN2, vision_config=dict(
        depth=4, hidden_size=32, intermediate_size=50, num_heads=4, out_hidden_size=48, fullatt_block_indexes=[1, 3]))
    _, vis = shape_from_config(config, image_size=56)
    assert (vis.hidden, vis.intermediate, vis.layers, vis.gated_mlp) == (32, 50, 4, True)
    assert vis.window_tokens == 64 and vis.full_attention_layers == (1, 3) and vis.projector == (128, 128, 48)
    with pytest.raises(ValueError):
        shape_from_config(config, image_size=50)


def test_flat_legacy_qwen2_vl_dict_gets_class_defaults():
    # Qwen2-VL-7B's real config.json: text fields at top level, 3 vision fields.
    legacy = {"model_type": "qwen2_vl", "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
              "num_hidden_layers": 28, "num_key_value_heads": 4, "vocab_size": 152064,
              "vision_config": {"in_chans": 3, "model_type": "qwen2_vl", "spatial_patch_size": 14}}
    assert preset_from_config(legacy).llm == PRESETS["qwen2-vl-7b"].llm
    assert preset_from_config(legacy).vision == PRESETS["qwen2-vl-7b"].vision


def test_presets_agree_with_transformers_default_vision_configs():
    # transformers' defaults are the real SigLIP-so400m (LLaVA-OV) and 7B Qwen ViT configs.
    ov = preset_from_config(LlavaOnevisionConfig(text_config=Qwen2Config(hidden_size=3584, intermediate_size=18944,
                             num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, vocab_size=152064)))
    assert (ov.llm, ov.vision, ov.image_tokens, ov.frame_tokens) == (
        OV7B.llm, OV7B.vision, OV7B.image_tokens, OV7B.frame_tokens)
    text7b = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4)
    # Qwen2.5-VL's config class defaults its vision hidden_size to 3584; the real config.json says 1280.
    cases = (("qwen2-vl-7b", Qwen2VLConfig, {}), ("qwen2.5-vl-7b", Qwen2_5_VLConfig, {"hidden_size": 1280}))
    for name, cls, vision in cases:
        preset = preset_from_config(cls(text_config=text7b, vision_config=vision))
        expected = PRESETS[name]
        assert (preset.llm, preset.vision) == (expected.llm, expected.vision)
        assert preset.frame_tokens == expected.frame_tokens


# ------------------------------------------------------------------ the flops() entry point
def test_report_is_json_ready_and_consistent():
    report = flops("llava-onevision-7b", frames=8, method="aim")
    data = json.loads(json.dumps(report.to_dict()))
    for key in ("base_tflops", "method_tflops", "ratio", "per_layer_tokens"):
        assert key in data
    assert data["ratio"] == pytest.approx(data["base_tflops"] / data["method_tflops"])
    assert sum(data["method_per_layer_tflops"]) + data["lm_head_tflops"] == pytest.approx(data["method_tflops"])
    method_total = data["method_tflops"] + data["vision_tflops"] + data["overhead_tflops"]
    assert data["total_method_tflops"] == pytest.approx(method_total)
    assert data["overhead_tflops"] > 0


def test_per_layer_tokens_list_or_callable_and_errors():
    listed = flops("llava-1.5-7b", image=True, per_layer_tokens=[616] * 2 + [328] * 30)  # FastV at its default K
    def fastv(w: Workload) -> list[int]:
        return fastv_tokens_per_layer(w.visual_tokens, w.text_tokens, w.llm.layers)

    called = flops("llava-1.5-7b", image=True, per_layer_tokens=fastv)
    assert listed.method_tflops == pytest.approx(called.method_tflops)
    assert listed.method_tflops == pytest.approx(flops("llava-1.5-7b", image=True, method="fastv").method_tflops)
    with pytest.raises(ValueError):
        flops("llava-1.5-7b", image=True, per_layer_tokens=[616] * 31)
    with pytest.raises(ValueError):
        flops("llava-1.5-7b", frames=8)  # no video preset
    with pytest.raises(ValueError):
        flops("no-such-model")
    with pytest.raises(TypeError):
        flops("llava-1.5-7b", image=True, merge_keep=0.5)  # options without a method name


def test_qwen_video_encodes_two_frames_per_pass():
    report = flops("qwen2-vl-7b", frames=9)
    assert report.visual_tokens == 5 * 256
    assert report.vision_tflops * 1e12 == pytest.approx(vision_flops(5, PRESETS["qwen2-vl-7b"].vision))


def test_leanvlm_method_stages_are_followed():
    class HalvePerFrame:
        def planned_tokens(self, tokens_per_frame: int) -> int:
            return tokens_per_frame // 2

    class DropAllAfter:
        def layers(self, num_layers: int) -> list[int]:
            return [1]

        def planned_keep(self, layer: int, num_layers: int, visual_into_llm: int, visual_now: int) -> int:
            return 0

    class Method:
        def stages(self):
            return [HalvePerFrame()], [DropAllAfter()]

    report = flops("llava-onevision-0.5b", frames=2, method=Method())
    assert report.per_layer_tokens == [100 + 196, 100 + 196] + [100] * 22


def test_workload_base_tokens():
    w = Workload(llm=OV7B.llm, tokens_per_frame=196, frames=32, text_tokens=100)
    assert w.base_tokens_per_layer() == [6372] * 28


def test_fastv_method_plan_matches_the_analytic_fastv():
    from leanvlm.methods import FastV

    for layer, keep in ((2, 0.5), (0, 0.25), (5, 0.1)):
        planned = flops("llava-1.5-7b", image=True, method=FastV(layer=layer, keep=keep))
        analytic = flops("llava-1.5-7b", image=True, method="fastv", layer=layer, keep=keep)
        assert planned.per_layer_tokens == analytic.per_layer_tokens


@pytest.mark.parametrize("image", [True, False])
def test_calculator_aim_follows_aims_per_modality_defaults(image):
    """`leanvlm flops --method aim` plans what AIM() runs: an image merges to 20% and prunes in the image
    window, a video keeps the SPEC's 25% and window (the paper's accounting test above is the video case)."""
    import leanvlm

    kind, frames = ("image", 1) if image else ("video", 8)
    report = flops("llava-onevision-0.5b", image=image, frames=None if image else frames, method="aim")
    method = flops("llava-onevision-0.5b", image=image, frames=None if image else frames, method=leanvlm.AIM())
    assert report.per_layer_tokens == method.per_layer_tokens
    spec = flops("llava-onevision-0.5b", image=image, frames=None if image else frames, method="aim",
                 merge_keep=0.25, l1=12, l2=19)
    assert (report.per_layer_tokens == spec.per_layer_tokens) is (kind == "video")

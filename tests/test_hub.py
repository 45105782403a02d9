"""leanvlm.hub: from_pretrained loading (a tiny model saved locally), generate with a method, media input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import leanvlm.models
from leanvlm import hub
from leanvlm.methods.fastv import FastV
from leanvlm.runtime.engine import _ACTIVE
from tiny_hf import save_tiny_vlm


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm"))


def picture(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, size=(40, 48, 3), dtype=np.uint8))


def test_load_and_generate_with_method(tiny_dir):
    vlm = hub.load(tiny_dir, "fastv", method_options={"layer": 1, "keep": 0.5}, device="cpu")
    assert isinstance(vlm.method, FastV) and vlm.method.keep == 0.5
    answer = vlm.generate(picture(), "what color is the shape ?", max_new_tokens=4)
    assert isinstance(answer, str) and answer
    sample = vlm.stats.samples[0]
    assert sample.visual_in == 16 and sample.layer_visual_tokens == [16, 16, 8, 8, 8, 8]
    assert vlm.model not in _ACTIVE  # applied for the call only


def test_keep_all_method_matches_plain_model(tiny_dir):
    plain = hub.load(tiny_dir, None, device="cpu")
    keep_all = hub.load(tiny_dir, FastV(layer=1, keep=1.0), device="cpu")
    question = "how many shapes are there ?"
    assert plain.stats is None
    assert plain.generate(picture(1), question, max_new_tokens=6) == keep_all.generate(picture(1), question, max_new_tokens=6)


def test_video_as_frames_and_gif(tiny_dir, tmp_path):
    vlm = hub.load(tiny_dir, "aim", method_options={"merge_keep": 0.5, "prune": False}, device="cpu")
    frames = [picture(k) for k in range(3)]
    vlm.generate(frames, "describe this video", max_new_tokens=2)
    sample = vlm.stats.samples[0]
    assert (sample.visual_in, sample.visual_into_llm) == (48, 24)  # LLaVA: one image per frame, 16 -> 8 each
    gif = tmp_path / "clip.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:] * 3, duration=50)
    kind, loaded = hub.load_media(gif, num_frames=4)
    assert kind == "video" and len(loaded) == 4


def test_load_media_kinds(tmp_path):
    path = tmp_path / "a.png"
    picture().save(path)
    assert hub.load_media(path)[0] == "image"
    assert hub.load_media(np.zeros((8, 8, 3)))[0] == "image"
    with pytest.raises(FileNotFoundError):
        hub.load_media(tmp_path / "missing.jpg")
    with pytest.raises(TypeError):
        hub.load_media(3.5)


def test_stats_recorder_collects_every_prompt(tiny_dir):
    vlm = hub.load(tiny_dir, "fastv", method_options={"layer": 2, "keep": 0.25}, device="cpu")
    with vlm.method.apply(vlm.model), hub.StatsRecorder(vlm.model, vlm.method) as recorder:
        for seed in range(3):
            inputs = vlm.inputs(picture(seed), "what color is the shape ?")
            vlm.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert len(recorder.samples) == 3  # one per prefill, decode steps add none
    summary = recorder.summary()
    assert summary["visual_in"] == 16 and summary["flops_ratio"] > 1
    assert not vlm.model._forward_hooks  # the recorder's hook is gone


def test_unsupported_class_is_reported_up_front(tiny_dir, monkeypatch):
    monkeypatch.setattr(leanvlm.models, "supported_models", lambda: ["SomethingElse"])
    with pytest.raises(ValueError, match="cannot apply methods to LlavaForConditionalGeneration"):
        hub.load(tiny_dir, "fastv", device="cpu")
    assert hub.load(tiny_dir, None, device="cpu").method is None  # without a method it loads


def test_resolve_method_errors():
    with pytest.raises(ValueError, match="known methods"):
        hub.resolve_method("nope")
    with pytest.raises(ValueError, match="options"):
        hub.resolve_method(FastV(), {"keep": 0.5})
    assert hub.resolve_method("none") is None


def test_prompt_without_chat_template():
    class Bare:
        chat_template = None
        image_token = "<image>"

    assert hub.build_prompt(Bare(), "q ?", images=2) == "<image>\n<image>\nq ?"


def test_dtype_names(tiny_dir):
    vlm = hub.load(tiny_dir, None, device="cpu", dtype="bfloat16")
    assert vlm.dtype == torch.bfloat16

"""Integration tests of the bundled video model (real_model/video_model.py): a stock
LlavaOnevisionForConditionalGeneration carrying the image model's parts plus the trained video adapter.

The image and video bases are built once per module into a temporary cache.
"""

from __future__ import annotations

import pytest
import torch

from leanvlm import AIM
from leanvlm.real_model import load_real_model
from leanvlm.real_model.clips import CLIP_ANSWERS, clips
from leanvlm.real_model.video_model import (
    build_video_base,
    load_real_video_model,
    num_video_tokens,
    prepare_video_inputs,
    score_clip_answers,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("leanvlm_cache"))


@pytest.fixture(scope="module")
def video_model(cache_dir):
    torch.set_num_threads(2)
    return load_real_video_model(cache_dir=cache_dir, progress=False)


@pytest.fixture(scope="module")
def fixed_clips():
    """One question about each of 10 fixed test clips, the question types in turn."""
    items = clips("test", 10, 7)
    return [items[5 * k + k % 5] for k in range(10)]


def test_video_tower_computes_the_image_towers_features(cache_dir):
    """The OneVision tower (config image_size 224, pre-interpolated position embeddings) reproduces the
    image model's DINOv2 (image_size 518, interpolating at run time) on a real 224 px frame."""
    image_model, processor = load_real_model(cache_dir=cache_dir, progress=False)
    video_base, _ = build_video_base(image_model, processor.tokenizer)
    pixels = processor.image_processor([clips("test", 1, 0)[0].frames[0]], return_tensors="pt").pixel_values
    with torch.no_grad():
        ours = video_base.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        reference = image_model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    for layer in (4, 12):
        assert torch.allclose(ours[layer], reference[layer], atol=1e-5)


def test_processor_lays_out_one_clip_as_513_tokens(video_model, fixed_clips):
    model, processor = video_model
    batch = prepare_video_inputs(processor, [fixed_clips[0].frames, fixed_clips[1].frames], ["a?", "a longer question?"])
    assert batch["pixel_values_videos"].shape == (2, 8, 3, 224, 224)
    assert (batch["input_ids"] == model.config.video_token_id).sum(1).tolist() == [num_video_tokens(8)] * 2 == [513, 513]
    with pytest.raises(ValueError, match="same number of frames"):
        prepare_video_inputs(processor, [fixed_clips[0].frames, fixed_clips[1].frames[:4]], ["a?", "b?"])


def test_answers_fixed_test_clips_and_aim_reduces_them(video_model, fixed_clips):
    """The shipped weights score 0.73 (plain) and 0.52 (AIM's video default, 4.96x) on the 200-question
    test split (weights_video/metrics.json) against ~0.3 by chance; on these 10 fixed clips: plain >= 6
    right; AIM merges every frame 64 -> 16 tokens (512 -> 128 into the LLM) at >= 4.8x fewer prefill FLOPs.
    (Issue 19 asks 9 of 10 and AIM within 1 answer: not reached; AIM gets 2 of these 10, 0.52 on the test
    split, see docs/video_model.md.)"""
    model, processor = video_model
    videos, questions = [i.frames for i in fixed_clips], [i.question for i in fixed_clips]
    truth = [i.answer for i in fixed_clips]
    plain = score_clip_answers(model, processor, videos, questions)
    assert sum(p == t for p, t in zip(plain, truth)) >= 6, list(zip(questions, plain, truth))
    method = AIM()
    with method.apply(model):
        reduced = score_clip_answers(model, processor, videos, questions)
    assert min(sample.flops_ratio for sample in method.stats.samples) >= 4.8  # 4.9-5.05 by question length
    assert all(s.visual_in == 512 and s.visual_into_llm == 128 for s in method.stats.samples)
    assert all(answer in CLIP_ANSWERS for answer in reduced)


def test_cached_generate_equals_uncached_on_a_real_clip(video_model, fixed_clips):
    model, processor = video_model
    inputs = prepare_video_inputs(processor, [fixed_clips[3].frames], [fixed_clips[3].question])
    with torch.no_grad(), AIM().apply(model):
        cached = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        uncached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_measured_flops_ratio_matches_the_calculator_on_the_shipped_config(video_model, fixed_clips):
    """What the runtime reports for AIM on a real clip equals `leanvlm flops --config weights_video/config.json
    --frames 8 --text-tokens T` (T: the prompt's non-visual tokens) within 1%."""
    import os

    from leanvlm import flops as F
    from leanvlm.real_model.video_model import WEIGHTS_VIDEO_DIR

    model, processor = video_model
    inputs = prepare_video_inputs(processor, [fixed_clips[0].frames], [fixed_clips[0].question])
    method = AIM()
    with torch.no_grad(), method.apply(model):
        model(**inputs)
    measured = method.stats.samples[0]
    text = inputs["input_ids"].shape[1] - 8 * 64  # the newline counts as text, as the runtime counts it
    report = F.flops(os.path.join(WEIGHTS_VIDEO_DIR, "config.json"), frames=8, text_tokens=text, method="aim")
    assert abs(measured.flops_ratio / report.ratio - 1) < 0.01


def test_leanvlm_eval_on_clips_answers_as_the_model_does(video_model, fixed_clips, tmp_path):
    """`leanvlm eval --dataset clips` (and a users' clip directory) run the bundled video model's closed-set
    scoring: the same answers as `score_clip_answers`, frames reported."""
    from leanvlm.cli.common import LoadedModel
    from leanvlm.cli.eval import evaluate, load_items

    model, processor = video_model
    loaded = LoadedModel(model, processor, "bundled video model", True)
    items = load_items("clips", 5)
    result = evaluate(loaded, items, None, progress=False)
    assert result["frames"] == 8 and result["mode"] == "closed" and result["visual_in"] == 512
    assert result["predictions"] == score_clip_answers(model, processor, [i.frames for i in items], [i.question for i in items])
    # a clip's questions share one vision-tower pass of its frames: same answers and stats as one by one
    shared = evaluate(loaded, items, AIM(), progress=False)
    alone = evaluate(loaded, items, AIM(), batch_size=1, progress=False, share_images=False)
    assert shared["predictions"] == alone["predictions"]
    assert shared["visual_tokens"] == alone["visual_tokens"] and shared["flops_ratio"] == alone["flops_ratio"]
    (tmp_path / "videos" / "3").mkdir(parents=True)
    for t, frame in enumerate(fixed_clips[0].frames):
        frame.save(tmp_path / "videos" / "3" / f"{t}.png")
    (tmp_path / "questions.json").write_text(f'[["{fixed_clips[0].question}", "{fixed_clips[0].answer}", 3]]')
    own = load_items(str(tmp_path))
    assert evaluate(loaded, own, None, progress=False)["predictions"] == score_clip_answers(
        model, processor, [fixed_clips[0].frames], [fixed_clips[0].question])

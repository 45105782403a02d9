"""Evaluation throughput paths give the answers of the plain one-by-one loop: image-grouped batches, the
vision tower once per distinct image, the plain model's shared prompt prefix, several processes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from leanvlm import AIM
from leanvlm.cli.batching import (SharedVisionEncoding, group_by_image, length_buckets, plan_batches,
                                  shared_prefix_last_logits)
from leanvlm.cli.common import LoadedModel
from leanvlm.cli.eval import evaluate, evaluate_processes, load_items, vision_tower
from leanvlm.hub import build_inputs
from leanvlm.models import get_adapter
from tiny import tiny_llava
from tiny_hf import save_tiny_vlm, save_tiny_vqa, tiny_processor

QUESTIONS = ["what color is the shape ?", "is there a red shape ?", "how many shapes are there ?",
             "what is the shape ?", "is there a blue circle in the picture ?"]


def picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, size=(32, 32, 3), dtype=np.uint8))


def one_by_one_logits(model, processor, images, questions) -> torch.Tensor:
    """[B, V] last-position logits of every (image, question) run alone: what the shared paths must equal."""
    with torch.no_grad():
        return torch.cat([model(**build_inputs(processor, [("image", im)], [q]), logits_to_keep=1).logits[:, -1]
                          for im, q in zip(images, questions)])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm"))


@pytest.fixture(scope="module")
def vqa_dir(tmp_path_factory):
    return save_tiny_vqa(tmp_path_factory.mktemp("vqa"), images=5)


def test_plan_batches_keeps_image_groups_whole():
    groups = [[0, 3], [1, 2, 4], [5], [6, 7, 8, 9, 10]]
    batches = plan_batches(groups, 4)
    assert batches == [[0, 3], [1, 2, 4, 5], [6, 7, 8, 9, 10]]
    assert sorted(i for b in batches for i in b) == list(range(11))
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        plan_batches(groups, 0)


def test_group_by_image_uses_image_key(vqa_dir):
    items = load_items(vqa_dir)
    groups = group_by_image(items)
    assert len(groups) == 5 and all(len({items[i].image_key for i in g}) == 1 for g in groups)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prefix_equals_one_by_one(attn):
    model, processor = tiny_llava("llama", attn), tiny_processor()
    images = [picture(0)] * 3 + [picture(1)] * 2
    inputs = build_inputs(processor, [("image", im) for im in images], QUESTIONS)
    got = shared_prefix_last_logits(model, inputs, [0, 0, 0, 1, 1], get_adapter(model).visual_token_ids)
    alone = one_by_one_logits(model, processor, images, QUESTIONS)
    assert got is not None and got.shape == alone.shape
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)


def test_shared_prefix_declines_when_visual_tokens_are_not_shared():
    model, processor = tiny_llava("llama", "sdpa"), tiny_processor()
    inputs = build_inputs(processor, [("image", picture(0))] * 2, QUESTIONS[:2])
    # the two rows of one group differ before their image tokens: the image is not inside a shared prefix
    ids = inputs["input_ids"].clone()
    visual = torch.isin(ids, torch.tensor(get_adapter(model).visual_token_ids))
    first_visual = int(visual[0].nonzero()[0, 0])
    ids[1, first_visual - 1] = 5  # the rows now differ before their image tokens
    assert shared_prefix_last_logits(model, {**inputs, "input_ids": ids}, [0, 0], get_adapter(model).visual_token_ids) is None


def test_shared_vision_encoding_same_outputs_and_stats():
    model, processor = tiny_llava("llama", "sdpa"), tiny_processor()
    images = [picture(0)] * 3 + [picture(1)] * 2
    inputs = build_inputs(processor, [("image", im) for im in images], QUESTIONS)
    method = AIM(merge_keep=0.5, l1=2, l2=4)
    with torch.no_grad():
        with method.apply(model):
            plain = model(**inputs, logits_to_keep=1).logits[:, -1]
            plain_tokens = [s.layer_tokens for s in method.stats.samples]
        tower = vision_tower(model)
        with method.apply(model), SharedVisionEncoding(tower) as shared:
            got = model(**inputs, logits_to_keep=1).logits[:, -1]
            got_tokens = [s.layer_tokens for s in method.stats.samples]
    assert shared.calls == 1 and shared.rows_saved == 3
    torch.testing.assert_close(got, plain, atol=1e-5, rtol=1e-5)
    assert got_tokens == plain_tokens
    assert not tower._forward_hooks and not tower._forward_pre_hooks  # removed on exit


@pytest.mark.parametrize("method", [None, AIM(merge_keep=0.5, l1=2, l2=4)], ids=["plain", "aim"])
def test_evaluate_batched_equals_one_by_one(tiny_dir, vqa_dir, method):
    from leanvlm.cli.common import load_model

    loaded = load_model(tiny_dir)
    items = load_items(vqa_dir)
    batched = evaluate(loaded, items, method, batch_size=16, max_new_tokens=3, progress=False)
    alone = evaluate(loaded, items, method, batch_size=1, max_new_tokens=3, progress=False, share_images=False)
    assert batched["predictions"] == alone["predictions"] and len(alone["predictions"]) == 10
    for key in ("accuracy", "visual_tokens", "flops_ratio"):
        assert batched[key] == pytest.approx(alone[key])


@pytest.mark.processes
def test_evaluate_two_processes_equals_one(tiny_dir, vqa_dir):
    from leanvlm.cli.common import load_model

    method = AIM(merge_keep=0.5, l1=2, l2=4)
    one = evaluate(load_model(tiny_dir), load_items(vqa_dir), method, max_new_tokens=3, progress=False)
    two = evaluate_processes(vqa_dir, None, "test", tiny_dir, method, processes=2, max_new_tokens=3)
    assert two["predictions"] == one["predictions"] and two["n"] == one["n"] == 10
    for key in ("accuracy", "visual_in", "visual_tokens", "base_tflops", "method_tflops", "flops_ratio"):
        assert two[key] == pytest.approx(one[key])


@pytest.mark.integration
def test_bundled_model_batched_equals_one_by_one():
    """The bundled model in closed mode: shared prefix (plain) and shared vision encoding (AIM) batches give
    the one-by-one answers."""
    from leanvlm.cli.common import load_model

    loaded = load_model(None)
    items = load_items("easyvqa", 10)
    assert len(group_by_image(items)) < len(items)  # several questions per image: the shared paths run
    for method, count in ((None, 10), (AIM(), 6)):
        batched = evaluate(loaded, items[:count], method, batch_size=16, progress=False)
        alone = evaluate(loaded, items[:count], method, batch_size=1, progress=False, share_images=False)
        assert batched["predictions"] == alone["predictions"]
        assert batched["visual_tokens"] == pytest.approx(alone["visual_tokens"])
        assert batched["flops_ratio"] == pytest.approx(alone["flops_ratio"])


def test_length_buckets_minimise_padding_plus_forward_cost():
    # one long row among short ones: alone in its bucket once the padding it saves exceeds a forward's cost
    assert length_buckets([5, 5, 5, 40], forward_cost=10) == [[0, 1, 2], [3]]
    assert length_buckets([5, 5, 5, 40], forward_cost=200) == [[0, 1, 2, 3]]
    # rows of one length are never split, and every row is in exactly one bucket
    buckets = length_buckets([3, 9, 3, 9, 3, 20, 9], forward_cost=1)
    assert buckets == [[0, 2, 4], [1, 3, 6], [5]]
    assert length_buckets([7], forward_cost=0) == [[0]]


def test_shared_prefix_in_length_buckets_equals_one_by_one(monkeypatch):
    """Suffixes of very different lengths run as several bucketed forwards, each on its own copy of the
    prefix cache: the same logits as every question alone."""
    import leanvlm.cli.batching as batching

    model, processor = tiny_llava("llama", "sdpa"), tiny_processor()
    questions = ["what ?", "what color is the big shape in the middle of this picture , and is it red ?", "is it ?",
                 "how many shapes are there in the picture , counting every circle and square ?", "shape ?"]
    images = [picture(0)] * 3 + [picture(1)] * 2
    inputs = build_inputs(processor, [("image", im) for im in images], questions)
    seen = []
    original = batching._suffix_logits
    monkeypatch.setattr(batching, "_suffix_logits", lambda model, suffixes, *a: seen.append(len(suffixes)) or
                        original(model, suffixes, *a))
    got = batching.shared_prefix_last_logits(model, inputs, [0, 0, 0, 1, 1], get_adapter(model).visual_token_ids,
                                             forward_cost=1)
    alone = one_by_one_logits(model, processor, images, questions)
    assert len(seen) >= 2 and sum(seen) == 5
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)


def test_shared_prefix_when_one_group_shares_more_than_the_image():
    """A group whose questions also share their first words has a longer common prefix than the others: the
    batch still runs on the shortest shared prefix (no whole-batch fallback) and equals one by one."""
    model, processor = tiny_llava("llama", "sdpa"), tiny_processor()
    questions = ["is there a red shape ?", "is there a blue circle ?", "is there a square ?", "what is the shape ?",
                 "how many shapes are there ?"]
    images = [picture(0)] * 3 + [picture(1)] * 2
    inputs = build_inputs(processor, [("image", im) for im in images], questions)
    got = shared_prefix_last_logits(model, inputs, [0, 0, 0, 1, 1], get_adapter(model).visual_token_ids)
    alone = one_by_one_logits(model, processor, images, questions)
    assert got is not None
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)

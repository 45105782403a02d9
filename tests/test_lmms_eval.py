"""The lmms-eval plugin: entry point declared and installed, discovery and construction by lmms-eval with a
tiny model saved locally (`make test` installs lmms-eval without its GPU-side dependencies), and the wrapper
logic on a stand-in base class."""

from __future__ import annotations

import importlib.metadata as metadata
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from leanvlm.integrations import lmms_eval as plugin
from leanvlm.methods.aim import AIM
from leanvlm.methods.fastv import FastV
from leanvlm.runtime.engine import _ACTIVE
from tiny_hf import save_tiny_vlm

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm"))


def picture(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, size=(32, 32, 3), dtype=np.uint8))


def test_pyproject_declares_entry_point_and_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["lmms_eval.models"] == {"leanvlm": "leanvlm.integrations.lmms_eval:manifests"}
    assert project["optional-dependencies"]["lmms"] == ["lmms-eval==0.7.3", "filelock<4"]


def test_entry_point_is_installed():
    points = [ep for ep in metadata.entry_points(group="lmms_eval.models") if ep.name == "leanvlm"]
    assert points, "reinstall leanvlm (pip install -e .) so its entry points are registered"
    assert points[0].load() is plugin.manifests


def test_split_method_args():
    kwargs = {"pretrained": "x", "method": "aim", "merge_keep": 0.5, "l1": "None", "importance": "text",
              "budget": "1/4", "leanvlm_stats": "s.json", "device": "cpu"}
    name, options, budget, stats = plugin.split_method_args(kwargs)
    assert (name, options, budget, stats) == ("aim", {"merge_keep": 0.5, "l1": None, "importance": "text"}, 0.25, "s.json")
    assert kwargs == {"pretrained": "x", "device": "cpu"}
    assert plugin.split_method_args({"method": "none", "keep": 0.5})[:2] == ("none", {})
    with pytest.raises(ValueError, match="unknown leanvlm method"):
        plugin.split_method_args({"method": "bogus"})


class StandIn:
    """The shape of an lmms-eval model: constructor kwargs, `.model`, request methods calling generate."""

    def __init__(self, pretrained: str, device: str = "cpu", **kwargs):
        assert kwargs == {}, f"Unexpected kwargs: {kwargs}"  # as lmms-eval's models do
        self._model = LlavaForConditionalGeneration.from_pretrained(pretrained).eval()
        self.processor = AutoProcessor.from_pretrained(pretrained)
        self.pretrained = pretrained

    @property
    def model(self):
        return self._model

    def generate_until(self, requests):
        from leanvlm.hub import build_inputs

        self.seen_active = self.model in _ACTIVE
        out = []
        for question in requests:
            inputs = build_inputs(self.processor, [("image", picture())], [question])
            ids = self.model.generate(**inputs, max_new_tokens=2, do_sample=False)
            out.append(self.processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:]))
        return out


def test_wrapper_applies_method_per_request_batch(tiny_dir, tmp_path):
    cls = plugin.wrap(StandIn, "Wrapped")
    stats = tmp_path / "stats.json"
    model = cls(pretrained=tiny_dir, method="fastv", layer=1, keep=0.5, leanvlm_stats=str(stats))
    assert model.leanvlm_method == FastV(layer=1, keep=0.5)
    answers = model.generate_until(["what color is the shape ?", "is there a red shape ?"])
    assert len(answers) == 2 and model.seen_active and model.model not in _ACTIVE
    summary = json.loads(stats.read_text())
    assert summary["samples"] == 2 and summary["method"] == "FastV" and summary["flops_ratio"] > 1
    budgeted = cls(pretrained=tiny_dir, method="aim", budget=0.25)
    assert isinstance(budgeted.leanvlm_method, AIM) and budgeted.leanvlm_method.merge_keep < 1
    plain = cls(pretrained=tiny_dir, method="none")
    assert plain.leanvlm_method is None and plain.generate_until(["what color is the shape ?"])


def test_lazy_classes_unknown_name():
    with pytest.raises(AttributeError):
        plugin.NoSuchModel  # noqa: B018


def test_lmms_eval_discovers_and_runs_plugin(tiny_dir):
    import lmms_eval.models as models
    from lmms_eval.api.instance import Instance
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    registry = ModelRegistryV2()
    registry.load_entrypoint_manifests()
    assert {"leanvlm_llava_hf", "leanvlm_llava_onevision", "leanvlm_qwen2_vl"} <= set(registry.list_model_names())
    assert {"leanvlm_llava_hf", "leanvlm_qwen2_vl"} <= set(models.list_available_models())
    assert registry.get_model_class("leanvlm_llava_hf").__name__ == "LlavaHfChat"  # chat preferred, as lmms-eval does
    cls = models.get_model("leanvlm_llava_hf", force_simple=True)
    assert cls is plugin.LlavaHf and cls.__mro__[2].__module__ == "lmms_eval.models.simple.llava_hf"
    assert registry.get_model_class("leanvlm_qwen2_vl").__mro__[2].__name__ == "Qwen2_VL"

    lm = cls.create_from_arg_string(f"pretrained={tiny_dir},method=aim,merge_keep=0.5,prune=false,device_map=cpu",
                                    {"batch_size": 1, "device": "cpu"})
    assert lm.leanvlm_method == AIM(merge_keep=0.5, prune=False)
    lm.task_dict = {"toy": {"test": {0: {"image": picture(0)}, 1: {"image": picture(1)}}}}
    requests = [Instance("generate_until", ("what color is the shape ?", {"max_new_tokens": 2, "until": ["</s>"]},
                                            lambda doc: [doc["image"]], i, "toy", "test"), i,
                         {"task": "toy", "doc_id": i, "repeats": 1}) for i in range(2)]
    with torch.no_grad():
        answers = lm.generate_until(requests)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    summary = lm.leanvlm_summary()
    assert summary["samples"] == 2 and summary["visual_in"] == 16 and summary["visual_tokens"] == 8
    assert lm.model not in _ACTIVE


class FetchingStandIn(StandIn):
    """lmms-eval's request protocol on the tiny model: fetches a batch's documents (the request's doc_to_visual)
    then generates the batch in one call; `fetch_ahead` fetches every document first (not attributable)."""

    batch = 2
    fetch_ahead = False

    def generate_until(self, requests):
        from leanvlm.hub import build_inputs

        def fetch(request):
            question, _, doc_to_visual, doc_id, task, split = request.args
            return question, doc_to_visual(self.task_dict[task][split][doc_id])[0]

        fetched = [fetch(r) for r in requests] if self.fetch_ahead else None
        out = []
        for first in range(0, len(requests), self.batch):
            batch = requests[first:first + self.batch]
            chunk = fetched[first:first + self.batch] if fetched else [fetch(r) for r in batch]
            inputs = build_inputs(self.processor, [("image", image) for _, image in chunk], [q for q, _ in chunk])
            ids = self.model.generate(**inputs, max_new_tokens=2, do_sample=False)
            out += self.processor.tokenizer.batch_decode(ids[:, inputs["input_ids"].shape[1]:])
        return out


QUESTIONS = ["what color is the shape ?", "how many shapes are there in the picture ?", "is the shape red ?"]


def toy_requests(questions):
    from lmms_eval.api.instance import Instance

    return [Instance("generate_until", (q, {"max_new_tokens": 2}, lambda doc: [doc["image"]], i, "toy", "test"), i,
                     {"task": "toy", "doc_id": i, "repeats": 1}) for i, q in enumerate(questions)]


def test_method_stats_attributed_to_documents(tiny_dir):
    from leanvlm.integrations.lmms_tasks import DOC_STATS

    def run(batch, fetch_ahead=False):
        cls = plugin.wrap(type("Fetching", (FetchingStandIn,), {"batch": batch, "fetch_ahead": fetch_ahead}), "Wrapped")
        lm = cls(pretrained=tiny_dir, method="aim", merge_keep=0.5, prune=False)
        lm.task_dict = {"toy": {"test": {i: {"leanvlm_id": f"toy-test-{i}", "image": picture(i)} for i in range(3)}}}
        for i in range(3):
            DOC_STATS.pop(f"toy-test-{i}", None)
        with torch.no_grad():
            answers = lm.generate_until(toy_requests(QUESTIONS))
        return lm, answers, {key: DOC_STATS.get(f"toy-test-{i}") for i, key in enumerate(QUESTIONS)}

    alone, alone_answers, alone_stats = run(batch=1)
    batched, batched_answers, batched_stats = run(batch=2)
    assert len({s.base_flops for s in alone_stats.values()}) == 3  # the questions' lengths tell the documents apart
    for question in QUESTIONS:  # each batch's samples went to its documents, in order
        a, b = alone_stats[question], batched_stats[question]
        assert (b.visual_in, b.visual_tokens, b.base_flops, b.method_flops) == (16, 8, a.base_flops, a.method_flops)
        assert b.reduction_seconds > 0
    summary = batched.leanvlm_summary()
    assert summary["documents"] == summary["samples"] == 3 and summary["visual_tokens"] == 8

    ahead, _, ahead_stats = run(batch=2, fetch_ahead=True)
    assert all(stats is None for stats in ahead_stats.values())  # fetched ahead: counted, but in no document
    summary = ahead.leanvlm_summary()
    assert summary["samples"] == 3 and "documents" not in summary


def test_bundled_and_device_defaults(monkeypatch):
    kwargs = {"pretrained": "x"}
    plugin._default_device(kwargs, {"pretrained": None, "device": None, "device_map": None})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert kwargs == {"pretrained": "x", "device": device, "device_map": device}
    kept = {"device": "cpu", "device_map": "auto"}
    plugin._default_device(kept, {"device": None, "device_map": None})
    assert kept == {"device": "cpu", "device_map": "auto"}
    monkeypatch.setenv("WORLD_SIZE", "2")
    several_gpus = {"device": "cuda"}
    plugin._default_device(several_gpus, {"device": None, "device_map": None})
    assert several_gpus == {"device": "cuda"}  # llava_hf puts each process on its own GPU
    no_map = {}
    plugin._default_device(no_map, {"device": None})
    assert no_map == {"device": device}  # only the parameters the wrapped model has

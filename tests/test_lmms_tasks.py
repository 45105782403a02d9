"""leanvlm's lmms-eval tasks: the documents are `leanvlm eval`'s items, lmms-eval indexes and builds the tasks,
scoring and the stats metrics; end to end (integration): the lmms-eval CLI on the bundled model in one and
in two processes gives the same answers and stats, and `leanvlm eval`'s accuracy on the same items."""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from leanvlm.cli.eval import load_items
from leanvlm.integrations import lmms_tasks
from tiny_hf import save_tiny_vqa


@pytest.fixture(scope="module")
def vqa_dir(tmp_path_factory):
    return save_tiny_vqa(tmp_path_factory.mktemp("vqa") / "toyvqa", images=3)


def test_prepared_documents_are_leanvlm_eval_items(vqa_dir):
    import datasets

    path = lmms_tasks.prepare_dataset(vqa_dir)
    assert lmms_tasks.prepare_dataset(vqa_dir) == path  # once per process
    docs = datasets.load_from_disk(path)["test"]
    items = load_items(vqa_dir)
    assert len(docs) == len(items) == 6
    for i, (doc, item) in enumerate(zip(docs, items)):
        assert doc["leanvlm_id"] == f"{vqa_dir}-test-{i}"
        assert (doc["question"], doc["answer"], doc["qtype"]) == (item.question, item.answer, item.qtype)
        assert lmms_tasks.doc_to_text(doc) == item.question
        [image] = lmms_tasks.doc_to_visual(doc)
        assert np.array_equal(np.asarray(image), np.asarray(item.image))  # PNG: lossless


def test_documents_of_clip_items_hold_their_frames():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Clip:  # the fields of leanvlm.real_model.clips.ClipItem that documents() reads
        frames: tuple
        question: str
        answer: str
        qtype: str
        clip_key: str

    frames = tuple(Image.fromarray(np.full((8, 8, 3), 40 * t, dtype=np.uint8)) for t in range(3))
    clips = [Clip(frames, "which shape appears first?", "circle", "order", "c0"),
             Clip(frames, "is there a circle in any frame?", "yes", "presence", "c0")]
    docs = lmms_tasks.documents(clips, "clips-test")
    assert docs["leanvlm_id"] == ["clips-test-0", "clips-test-1"]
    for doc in docs:
        visuals = lmms_tasks.doc_to_visual(doc)
        assert [np.asarray(v).tolist() for v in visuals] == [np.asarray(f).tolist() for f in frames]


def test_prepared_attribute_names_a_dataset():
    assert lmms_tasks.prepared_scenes == lmms_tasks.prepare_dataset("scenes")
    with pytest.raises(AttributeError):
        lmms_tasks.no_such_thing  # noqa: B018


def test_process_results_scores_like_leanvlm_eval_and_adds_stats():
    doc = {"leanvlm_id": "toy-test-0", "answer": "red"}
    lmms_tasks.DOC_STATS.pop("toy-test-0", None)
    assert lmms_tasks.process_results(doc, ["Red."]) == {"accuracy": 1.0}
    assert lmms_tasks.process_results(doc, ["reddish"]) == {"accuracy": 0.0}
    lmms_tasks.record_doc_stats("toy-test-0", lmms_tasks.DocStats(16, 8, 4.0, 1.0, 0.5))
    assert lmms_tasks.process_results(doc, ["red"]) == {"accuracy": 1.0, "visual_in": 16, "visual_tokens": 8,
                                                        "flops_ratio": (4.0, 1.0), "reduction_seconds": 0.5}
    # the ratio of the mean FLOPs, as `leanvlm eval` reports it (not the mean of the ratios, 2.5)
    assert lmms_tasks.flops_ratio([(4.0, 1.0), (2.0, 2.0)]) == 2.0
    with pytest.raises(ValueError, match="at least one"):
        lmms_tasks.flops_ratio([])


def test_lmms_eval_indexes_and_builds_the_tasks():
    """lmms-eval's TaskManager on this directory (the CLI test proves the entry point adds it by itself;
    indexing lmms-eval's own 300 task folders here would take ~25 s)."""
    pytest.importorskip("tenacity", reason="lmms-eval's task module needs the Makefile's LMMS_DEPS")
    from lmms_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager("WARNING", include_path=lmms_tasks.TASK_DIR, include_defaults=False)
    assert manager.all_tasks == ["leanvlm_clips", "leanvlm_easyvqa", "leanvlm_scenes"]
    task = get_task_dict(["leanvlm_scenes"], manager)["leanvlm_scenes"]
    docs = task.test_docs()
    items = load_items("scenes")
    assert len(docs) == len(items) and [d["question"] for d in docs] == [it.question for it in items]
    assert np.array_equal(np.asarray(task.doc_to_visual(docs[5])[0]), np.asarray(items[5].image))
    assert task.config.generation_kwargs["max_new_tokens"] == 8
    assert task.process_results(docs[0], [items[0].answer])["accuracy"] == 1.0
    clips = get_task_dict(["leanvlm_clips"], manager)["leanvlm_clips"]
    clip_docs, clip_items = clips.test_docs(), load_items("clips")
    assert [d["question"] for d in clip_docs] == [it.question for it in clip_items]
    frames = clips.doc_to_visual(clip_docs[7])
    assert len(frames) == 8 and np.array_equal(np.asarray(frames[3]), np.asarray(clip_items[7].frames[3]))


# ------------------------------------------------------------------------------------------- end to end
LIMIT = 8
TASK = "leanvlm_scenes"  # the model gets some of these wrong: equal accuracies mean something


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _lmms_eval(out, processes: int) -> subprocess.Popen:
    launcher = ([sys.executable, "-m", "lmms_eval"] if processes == 1 else
                # --multi_gpu without GPUs: torchrun-style processes on gloo (`--cpu` would start only one)
                [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                 "--main_process_port", str(_free_port()), "-m", "lmms_eval"])
    command = launcher + ["--model", "leanvlm_llava_hf",
                          "--model_args", f"pretrained=bundled,method=aim,leanvlm_stats={out}/stats.json",
                          "--tasks", TASK, "--limit", str(LIMIT), "--output_path", str(out), "--log_samples"]
    import leanvlm

    # the processes import this leanvlm (absolute paths: they run in `out`)
    paths = [os.path.dirname(os.path.dirname(leanvlm.__file__))]
    paths += [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    log = open(out / "log.txt", "w")
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=out)


def _outputs(out) -> tuple[dict, dict, dict]:
    results = glob.glob(f"{out}/*/*_results.json")
    assert len(results) == 1, (out / "log.txt").read_text()[-3000:]  # lmms-eval exits 0 after most errors
    [results] = results
    [samples] = glob.glob(f"{out}/*/*_samples_{TASK}.jsonl")
    answers = {}
    for line in open(samples):
        row = json.loads(line)
        answers[row["doc_id"]] = row["filtered_resps"]
    return json.load(open(results))["results"][TASK], answers, json.load(open(f"{out}/stats.json"))


@pytest.mark.integration
def test_lmms_eval_one_and_two_processes_agree_with_leanvlm_eval(tmp_path):
    pytest.importorskip("tenacity", reason="the lmms-eval CLI needs the Makefile's LMMS_DEPS")
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    runs = {out: _lmms_eval(out, processes) for out, processes in ((one, 1), (two, 2))}

    # meanwhile, `leanvlm eval --mode generate --batch-size 1` on the same items
    import torch

    from leanvlm.cli.common import load_model
    from leanvlm.cli.eval import evaluate
    from leanvlm.methods.aim import AIM

    torch.set_num_threads(1)
    with torch.no_grad():
        items = load_items(TASK.removeprefix("leanvlm_"), LIMIT)
        reference = evaluate(load_model(None), items, AIM(), batch_size=1, mode="generate")

    for out, run in runs.items():
        assert run.wait(timeout=900) == 0, (out / "log.txt").read_text()[-3000:]
    single, single_answers, single_stats = _outputs(one)
    double, double_answers, double_stats = _outputs(two)
    assert "Running on rank 1" in (two / "log.txt").read_text()  # two processes really ran

    assert sorted(single_answers) == list(range(LIMIT)) and single_answers == double_answers
    for metric in ("accuracy", "visual_in", "visual_tokens", "flops_ratio"):
        assert single[f"{metric},none"] == pytest.approx(double[f"{metric},none"], rel=1e-12), metric
    assert single_stats["documents"] == double_stats["documents"] == LIMIT  # gathered over both processes
    assert single_stats["visual_tokens"] == pytest.approx(double_stats["visual_tokens"])
    assert double["visual_tokens,none"] < double["visual_in,none"] and double["reduction_seconds,none"] > 0

    # `leanvlm eval` on the same items: the same accuracy and method stats
    assert reference["accuracy"] == single["accuracy,none"]
    assert reference["visual_tokens"] == pytest.approx(single["visual_tokens,none"])
    assert reference["flops_ratio"] == pytest.approx(single["flops_ratio,none"])


def test_task_files_are_package_data():
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["leanvlm"]
    shipped = {path for pattern in patterns for path in (root / "src" / "leanvlm").glob(pattern)}
    task_files = {p for p in Path(lmms_tasks.TASK_DIR).iterdir() if p.name.endswith(("yaml", "_yaml"))}
    assert task_files and task_files <= shipped

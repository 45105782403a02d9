"""benchmarks/bench_speed.py helpers: the CUDA variant skips cleanly without a GPU, and the mixed-length
batch keeps every prompt's visual span and left-pads them."""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_speed", os.path.join(ROOT, "benchmarks", "bench_speed.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_speed"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_cuda_variant_skips_without_gpu(monkeypatch, capsys, tmp_path):
    bench = load_bench()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--device", "cuda", "--out", str(tmp_path)]) == []
    assert "needs a CUDA GPU" in capsys.readouterr().out and not any(tmp_path.iterdir())


def test_mixed_batch_left_padded_with_whole_visual_span():
    bench = load_bench()
    ids = torch.cat([torch.arange(1000, 1014), torch.full((36,), bench.IMAGE_TOKEN), torch.arange(2000, 2086)])[None]
    workload = bench.Workload("image", 0, ids, {}, 0.0, {})
    input_ids, mask = bench.mixed_batch(workload, 4, pad_id=7)
    lengths = mask.sum(1).tolist()
    assert lengths == [136, 124, 112, 100] and input_ids.shape == (4, 136)
    assert bool(mask[:, -1].all())  # left padded: every row ends with a real token
    assert ((input_ids == bench.IMAGE_TOKEN).sum(1) == 36).all()
    assert (input_ids[mask == 0] == 7).all()


def test_reduction_share_is_the_prefills_and_decode_hooks_are_reported_apart():
    """The decode steps after the last prefill add their hooks' time to the same stats object: the row's
    reduction seconds must be the prefill's alone, the decode's per new token reported apart."""
    bench = load_bench()
    torch.manual_seed(0)
    model = bench.build_model(tiny=True)
    from leanvlm.models import get_adapter

    capture = get_adapter(model).install_vision_probe()
    workload = bench.build_workload(model, "video-2f", 2, 2, 4)
    capture.remove()
    import leanvlm

    method = leanvlm.AIM()
    row, = bench.measure_interleaved(model, workload, {"aim": method}, repeats=1, new_tokens=6, capture=capture)
    decode_seconds = row["decode_reduction_ms_per_token"] * 6 / 1000
    assert row["reduction_s"] > 0 and decode_seconds > 0
    assert abs(row["reduction_s"] + decode_seconds - method.stats.reduction_seconds) < 1e-9
    assert row["reduction_share"] == row["reduction_s"] / row["prefill_s"]


def test_tiny_run_writes_table_json_and_plot(tmp_path):
    """The whole benchmark on a tiny config: every row has its speedup, GEMM rate and reduction share, and
    the table, JSON and plot are written."""
    bench = load_bench()
    rows = bench.main(["--tiny", "--frames", "8", "--no-image", "--methods", "none", "aim", "itp", "--repeats", "1",
                       "--new-tokens", "2", "--budget", "0.75", "--no-e2e", "--batches", "none", "--out", str(tmp_path)])
    assert [r["method"] for r in rows] == ["none", "aim", "itp"]
    for row in rows:
        assert row["speedup"] > 0 and row["gemm_rate_vs_plain"] > 0 and 0 <= row["reduction_share"] < 1
    assert rows[0]["gemm_rate_vs_plain"] == 1.0 and rows[1]["flops_ratio"] > 1
    # fewer tokens a layer: a smaller attention share, so halving the scores helps the plain prompt more
    assert 1 < rows[1]["causal_flops_ratio"] < rows[1]["flops_ratio"] and rows[0]["causal_flops_ratio"] == 1.0
    assert {p.name for p in tmp_path.iterdir()} == {"speed-tiny.md", "speed-tiny.json", "speed-tiny.png"}
    assert "GEMM rate vs plain" in (tmp_path / "speed-tiny.md").read_text()
    assert "speedup / causal FLOPs" in (tmp_path / "speed-tiny.md").read_text()

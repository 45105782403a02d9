"""benchmarks/bench_reduction.py: the baseline export imports as its own package, and a tiny alternating run
reports both versions and whether they kept the same tokens."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def in_git_checkout() -> bool:
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True).returncode == 0
    except OSError:
        return False


@pytest.mark.skipif(not in_git_checkout(), reason="the baseline is exported from this repository's git history")
def test_tiny_run_compares_head_with_this_tree():
    path = os.path.join(ROOT, "benchmarks", "bench_reduction.py")
    spec = importlib.util.spec_from_file_location("bench_reduction", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_reduction"] = bench
    spec.loader.exec_module(bench)
    lines = bench.main(["--baseline", "HEAD", "--tiny", "--frames", "2", "--methods", "aim:importance=pagerank",
                        "--repeats", "1"])
    assert "video-2f, aim:importance=pagerank: the same tokens kept before and inside the LLM: True" in lines
    assert any(line.startswith("| in-LLM scoring: PageRank ms (CPU) |") for line in lines)
    # this process's leanvlm is left unwrapped, and the baseline is gone
    from leanvlm.methods import aim
    from leanvlm.ops.importance import ranking_importance

    assert aim.ranking_importance is ranking_importance
    assert not any(name.startswith("leanvlm_baseline") for name in sys.modules)

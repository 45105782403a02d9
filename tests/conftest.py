import sys
from pathlib import Path

import pytest
import torch

# tests import their shared tiny-model builders as `tiny`
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def one_thread_for_tiny_models(request):
    """Tiny models gain nothing from intra-op threads, and on a loaded machine OpenMP threads that wait for
    a busy core make each small kernel ~100x slower: unit tests run single-threaded; integration tests
    (the real model) keep torch's default."""
    if request.node.get_closest_marker("integration") is not None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- support matrix (tests/test_models.py, scripts/support_matrix.py) -------------------------------------
import json  # noqa: E402

_MATRIX_KEYS = ("family", "method", "modality", "attn")
_matrix_results: list[dict] = []


def pytest_addoption(parser):
    parser.addoption("--support-matrix", default=None, metavar="PATH",
                     help="write the outcomes of the support_matrix tests (family x method x modality x attn) as JSON")


def pytest_configure(config):
    config.addinivalue_line("markers", "support_matrix: a family x method x modality x attention coverage test")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    params = getattr(getattr(item, "callspec", None), "params", {})
    if item.get_closest_marker("support_matrix") is None or not all(key in params for key in _MATRIX_KEYS):
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        _matrix_results.append({**{key: params[key] for key in _MATRIX_KEYS}, "check": item.originalname,
                                "outcome": report.outcome})


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("--support-matrix")
    if path and _matrix_results:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(_matrix_results, indent=1))


def pytest_collection_modifyitems(config, items):
    """`matrix_full` cells (the support matrix beyond the default subset) run only when asked for by marker:
    `pytest -m matrix_full` (CI) or `-m support_matrix` (scripts/support_matrix.py)."""
    expression = config.getoption("markexpr") or ""
    if "matrix_full" in expression or "support_matrix" in expression:
        return
    selected = [item for item in items if item.get_closest_marker("matrix_full") is None]
    if len(selected) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("matrix_full")])
        items[:] = selected

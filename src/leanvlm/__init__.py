"""leanvlm: fewer visual tokens for multimodal LLMs on HuggingFace transformers.

    import leanvlm
    method = leanvlm.FastV(layer=1, keep=0.5)
    with method.apply(model):
        out = model.generate(**inputs)
    method.stats
"""

from __future__ import annotations

import importlib
from typing import Any

from leanvlm.compat import warn_if_untested

__version__ = "0.1.0"

# Public names -> the module that defines them, imported on first use: `import leanvlm` (and so the
# `leanvlm` command's start-up) does not pay for torch and transformers until something needs them.
_EXPORTS = {
    **dict.fromkeys(("AIM", "ITP", "METHODS", "Compose", "FastV", "LLMStage", "Method", "Pool", "PreLLMStage",
                     "PruMerge", "PruMergePlus", "PyramidDrop", "RandomDrop", "Selection", "VisionZip",
                     "make_method"), "leanvlm.methods"),
    **dict.fromkeys(("CDPruner", "DART", "DivPrune", "FastVID", "HoliTom", "VisPruner"), "leanvlm.methods"),
    "load": "leanvlm.hub",
    "supported_models": "leanvlm.models",
    "ReductionStats": "leanvlm.stats",
    "SampleStats": "leanvlm.stats",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'leanvlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


warn_if_untested()

"""leanvlm: fewer visual tokens for multimodal LLMs on HuggingFace transformers.

    import leanvlm
    method = leanvlm.FastV(layer=2, keep=0.5)
    with method.apply(model):
        out = model.generate(**inputs)
    method.stats
"""

from leanvlm.compat import warn_if_untested
from leanvlm.methods import (
    AIM,
    ITP,
    METHODS,
    Compose,
    FastV,
    LLMStage,
    Method,
    Pool,
    PreLLMStage,
    PruMerge,
    PruMergePlus,
    PyramidDrop,
    RandomDrop,
    Selection,
    VisionZip,
    make_method,
)
from leanvlm.hub import load
from leanvlm.models import supported_models
from leanvlm.stats import ReductionStats, SampleStats

__version__ = "0.1.0"

warn_if_untested()

__all__ = [
    "AIM", "ITP", "METHODS", "Compose", "FastV", "LLMStage", "Method", "Pool", "PreLLMStage", "PruMerge",
    "PruMergePlus", "PyramidDrop", "RandomDrop", "ReductionStats", "SampleStats", "Selection", "VisionZip",
    "load", "make_method", "supported_models",
]

"""leanvlm: fewer visual tokens for multimodal LLMs on HuggingFace transformers.

    import leanvlm
    method = leanvlm.FastV(layer=2, keep=0.5)
    with method.apply(model):
        out = model.generate(**inputs)
    method.stats
"""

from leanvlm.methods import Compose, FastV, LLMStage, Method, PreLLMStage, Selection
from leanvlm.models import supported_models
from leanvlm.stats import ReductionStats, SampleStats

__version__ = "0.1.0"

__all__ = [
    "Compose",
    "FastV",
    "LLMStage",
    "Method",
    "PreLLMStage",
    "ReductionStats",
    "SampleStats",
    "Selection",
    "supported_models",
]

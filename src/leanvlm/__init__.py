"""leanvlm: fewer visual tokens for multimodal LLMs on HuggingFace transformers.

    import leanvlm
    method = leanvlm.FastV(layer=2, keep=0.5)
    with method.apply(model):
        out = model.generate(**inputs)
    method.stats
"""

from leanvlm.methods import AIM, ITP, Compose, FastV, InflectionCut, LLMStage, Method, PreLLMStage, ProgressivePrune, Selection, TextRelevancePrune, TokenMerge
from leanvlm.models import supported_models
from leanvlm.stats import ReductionStats, SampleStats

__version__ = "0.1.0"

__all__ = [
    "AIM",
    "Compose",
    "FastV",
    "ITP",
    "InflectionCut",
    "LLMStage",
    "Method",
    "PreLLMStage",
    "ProgressivePrune",
    "ReductionStats",
    "SampleStats",
    "Selection",
    "TextRelevancePrune",
    "TokenMerge",
    "supported_models",
]

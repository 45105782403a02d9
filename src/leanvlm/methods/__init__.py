"""One file per method; each is a small dataclass composed of stages (see `base`)."""

from leanvlm.methods.aim import AIM, ProgressivePrune, TokenMerge
from leanvlm.methods.base import Compose, LLMStage, Method, PreLLMStage, Selection
from leanvlm.methods.fastv import FastV
from leanvlm.methods.itp import ITP, InflectionCut, TextRelevancePrune

__all__ = ["AIM", "Compose", "FastV", "ITP", "InflectionCut", "LLMStage", "Method", "PreLLMStage", "ProgressivePrune", "Selection", "TextRelevancePrune", "TokenMerge"]

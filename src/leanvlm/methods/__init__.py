"""One file per method; each is a small dataclass composed of stages (see `base`)."""

from leanvlm.methods.aim import AIM, ProgressivePrune, TokenMerge
from leanvlm.methods.base import Compose, LLMStage, Method, PreLLMStage, Selection
from leanvlm.methods.fastv import FastV

__all__ = ["AIM", "Compose", "FastV", "LLMStage", "Method", "PreLLMStage", "ProgressivePrune", "Selection", "TokenMerge"]

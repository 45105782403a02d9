"""One file per method; each is a small dataclass composed of stages (see `base`)."""

from leanvlm.methods.aim import AIM, ProgressivePrune, TokenMerge
from leanvlm.methods.base import Compose, LLMStage, Method, PreLLMStage, Selection
from leanvlm.methods.cdpruner import CDPruner, ConditionalDPP
from leanvlm.methods.dart import DART, DuplicateAwareDrop
from leanvlm.methods.divprune import DiverseSubset, DivPrune
from leanvlm.methods.fastv import FastV, LastTokenAttentionDrop
from leanvlm.methods.fastvid import DensityPrune, FastVID
from leanvlm.methods.holitom import HoliTom, HolisticMerge, SimilarityMerge
from leanvlm.methods.itp import ITP, InflectionCut, TextRelevancePrune
from leanvlm.methods.pool import GridPool, Pool
from leanvlm.methods.prumerge import OutlierPruneMerge, PruMerge, PruMergePlus
from leanvlm.methods.pyramiddrop import PyramidDrop, PyramidStages
from leanvlm.methods.randomdrop import RandomDrop, RandomSelect
from leanvlm.methods.registry import METHODS, budget_options, make_method, method_for_budget, visual_budget
from leanvlm.methods.visionzip import DominantContextual, VisionZip
from leanvlm.methods.vispruner import ImportantDiverse, VisPruner

__all__ = [
    "AIM", "CDPruner", "Compose", "ConditionalDPP", "DART", "DivPrune", "DiverseSubset", "DuplicateAwareDrop",
    "ImportantDiverse", "VisPruner", "DominantContextual", "FastV", "GridPool", "ITP", "InflectionCut", "LLMStage",
    "LastTokenAttentionDrop", "METHODS", "Method", "OutlierPruneMerge", "Pool", "PreLLMStage", "ProgressivePrune",
    "PruMerge", "PruMergePlus", "PyramidDrop", "PyramidStages", "RandomDrop", "RandomSelect", "Selection",
    "TextRelevancePrune", "TokenMerge", "VisionZip", "budget_options", "make_method", "method_for_budget",
    "visual_budget",
    "DensityPrune", "FastVID", "HoliTom", "HolisticMerge", "SimilarityMerge",
]

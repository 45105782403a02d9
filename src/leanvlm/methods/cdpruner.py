"""CDPruner (Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token
Pruning in MLLMs", NeurIPS 2025, arXiv 2506.10967), before the LLM, per image / video frame:

A frame of T tokens keeps K = max(1, round(keep * T)) of them, the greedy MAP subset of a determinantal
point process whose kernel is conditioned on the instruction:
1. Similarity S_ij = cos(x_i, x_j) of the projector outputs x [T, D].
2. Relevance r_i = mean over the instruction tokens m of -cos(x_i, e_m) (the published code's sign), with
   e [M, D] the LLM input embeddings of the instruction (the text after the last visual token:
   `TokenLayout.question`), min-max normalised over the frame: (r - min + 1e-6) / (max - min + 1e-6). With
   theta < 1, r becomes exp(alpha r), alpha = theta / (2 (1 - theta)) (the paper's relevance / diversity
   trade-off); theta = 1 uses r as is. No instruction tokens: r = 1 (plain DPP on S).
3. Kernel L = diag(r) S diag(r); keep the greedy MAP picks (`ops.diversity.dpp_greedy_map`, the fast
   incremental-Cholesky greedy of Chen et al. 2018) in raster order; the others are dropped.

Relevance embedding per family: the paper's LLaVA code compares CLIP's projected patch embeddings with
CLIP text-encoder embeddings of the instruction. HF VLMs ship no text tower of their vision encoder, so on
every family here (LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL / Qwen2.5-VL, the bundled model) the
relevance compares the projector outputs with the LLM's own input embeddings of the instruction tokens,
the space both live in once they enter the LLM (the paper's recipe for models without a CLIP text tower).

Defaults: keep = 64 / 576 (the paper's headline LLaVA-1.5 setting), theta = 1.0 (the published LLaVA code:
plain relevance), negate = True (the published sign; False ranks the tokens MORE similar to the text higher).

Deviations from the published code (read for facts only, not copied):
- Relevance from the LLM input embeddings instead of CLIP's text tower (see above).
- Min-max normalisation per image / frame (the LLaVA code normalises over the whole batch at once, so an
  image's kernel depends on its batch-mates) with 1e-6 also in the denominator (no division by zero when
  every token is equally relevant).
- Greedy MAP in float64 and, once the kernel's rank is exhausted, the remaining picks by the kernel diagonal
  (the code divides by sqrt of a zero residual there).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from leanvlm.methods.base import LLMStage, Method, PreLLMStage, check_fraction
from leanvlm.methods.divprune import frame_keep_count
from leanvlm.ops.diversity import cosine_similarity_matrix, dpp_greedy_map
from leanvlm.runtime.stages import INSTRUCTION
from leanvlm.runtime.visual import VisualItem

PAPER_KEEP = 64 / 576


def instruction_relevance(x: torch.Tensor, instruction: torch.Tensor | None, theta: float = 1.0,
                          negate: bool = True) -> torch.Tensor:
    """CDPruner's per-token relevance (step 2 of the module doc). x [T, D], instruction [M, D] or None -> [T] float."""
    if instruction is None or instruction.shape[0] == 0:
        return torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
    unit_x = x.float() / torch.linalg.vector_norm(x.float(), dim=-1, keepdim=True).clamp(min=1e-12)
    text = instruction.float().to(x.device)
    unit_text = text / torch.linalg.vector_norm(text, dim=-1, keepdim=True).clamp(min=1e-12)
    relevance = (unit_x @ unit_text.T).mean(dim=1)  # [T]
    if negate:
        relevance = -relevance
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min() + 1e-6)
    if theta < 1.0:
        relevance = torch.exp(theta / (2 * (1 - theta)) * relevance)
    return relevance


@dataclass
class ConditionalDPP(PreLLMStage):
    """CDPruner's pre-LLM stage (see the module doc)."""

    keep: float = PAPER_KEEP
    theta: float = 1.0
    negate: bool = True

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({INSTRUCTION})

    def planned_tokens(self, tokens_per_frame: int) -> int:
        return frame_keep_count(self.keep, tokens_per_frame)

    def select(self, frame: torch.Tensor, instruction: torch.Tensor | None) -> torch.Tensor:
        """Kept positions of one frame, ascending. frame [T, D], instruction [M, D] or None -> [K] long."""
        relevance = instruction_relevance(frame, instruction, self.theta, self.negate)  # [T]
        kernel = relevance[:, None] * cosine_similarity_matrix(frame) * relevance[None, :]  # [T, T]
        return torch.sort(dpp_greedy_map(kernel, frame_keep_count(self.keep, frame.shape[0]))).values

    def reduce(self, item: VisualItem) -> VisualItem:
        if self.keep == 1.0:
            return item
        return item.select([self.select(frame, item.instruction) for frame in item.frames])


@dataclass
class CDPruner(Method):
    """CDPruner: per image / frame keep `keep` of the visual tokens, the greedy MAP of a DPP over their
    similarity weighted by relevance to the instruction, before the LLM. See the module doc."""

    keep: float = PAPER_KEEP
    theta: float = 1.0
    negate: bool = True

    def __post_init__(self) -> None:
        check_fraction("keep", self.keep)
        check_fraction("theta", self.theta)

    def stages(self) -> tuple[Sequence[PreLLMStage], Sequence[LLMStage]]:
        return (ConditionalDPP(self.keep, self.theta, self.negate),), ()

    @classmethod
    def budget_options(cls, keep_fraction: float, num_layers: int) -> dict[str, float]:
        """Visual-token budget -> keep = budget (every LLM layer sees the pre-LLM count)."""
        return {"keep": keep_fraction}

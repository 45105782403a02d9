"""The stage protocols the runtime runs: what a pre-LLM stage and an in-LLM stage must provide.

They live below the runtime so that `runtime/engine.py` needs nothing from `methods/`; methods implement
them (and `methods/base.py` re-exports them for method authors).
- A `PreLLMStage` reduces the visual tokens of every image / video frame after the projector, so the LLM
  input sequence is shorter from its first layer on.
- An `LLMStage` drops tokens from the hidden-state sequence after given decoder layers. The runtime asks it
  for a `Selection` (scores over the current tokens, which of them are candidates, how many candidates to
  keep per sample); the shared runtime does the top-k, keeps original order, and removes the dropped
  tokens from the hidden states, the positions, the attention mask and the later layers' KV cache. A stage
  may also fold the tokens it drops into the ones it keeps first (`LLMStage.merge`, a `HiddenMerge`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from leanvlm.runtime.context import LayerContext
    from leanvlm.runtime.visual import VisualItem


def check_layer(name: str, layer: int, num_layers: int) -> None:
    """Validate a 0-indexed decoder layer after which a stage drops tokens."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
        raise ValueError(f"{name} must be a decoder layer index in [0, {num_layers - 1}] for this model, got {layer!r}")


@dataclass
class Selection:
    """An in-LLM stage's decision at one layer.

    scores [B, N] (higher = more important), candidates [B, N] bool (tokens that may be dropped; all
    others are kept), keep [B] long (how many candidates to keep per sample).
    """

    scores: torch.Tensor
    candidates: torch.Tensor
    keep: torch.Tensor


@dataclass
class HiddenMerge:
    """How an in-LLM stage folds the tokens it drops into tokens it keeps, before the drop.

    target [B, N] long: the slot each current slot's hidden state is added into (-1: none; a kept target
    lists itself); weight [B, N] float: that state's weight in its target's new state. Every slot some slot
    targets becomes sum(weight[s] * hidden[s] for the slots s targeting it); every other slot is unchanged.
    """

    target: torch.Tensor
    weight: torch.Tensor


class LLMStage(ABC):
    """Drops tokens after some decoder layers. Layers are 0-indexed: acting at layer l means layer l still
    sees every token, its attention is what the stage scores with, and layers > l see only the kept ones."""

    @abstractmethod
    def layers(self, num_layers: int) -> list[int]:
        """The decoder layers after which this stage drops tokens (validated against the model's depth)."""

    @abstractmethod
    def select(self, ctx: LayerContext) -> Selection:
        """Score the current tokens at `ctx.layer` and say how many candidates to keep."""

    def merge(self, ctx: LayerContext, kept: torch.Tensor) -> HiddenMerge | None:
        """Hidden states of dropped tokens to fold into kept ones before the drop (None, the default: a
        plain drop). kept [B, N] bool: the slots that survive this layer. The runtime records the merge and
        replays it on uncached generation steps, like the drop itself."""
        return None

    def for_kind(self, kind: str) -> LLMStage:
        """This stage with any per-modality default resolved for inputs of `kind` ("image" / "video"), for
        analytic plans (the runtime resolves them per sample). Default: the stage itself."""
        return self

    def planned_keep(self, layer: int, num_layers: int, visual_into_llm: int, visual_now: int) -> int:
        """Analytic visual-token count after `layer` of a `num_layers`-deep model (for FLOPs budgets), given
        the count that entered the LLM and the count at this layer. Input-dependent stages estimate."""
        return visual_now


#: The `needs` entry asking for the instruction's LLM input embeddings (`VisualItem.instruction`), which
#: the runtime provides itself on every family; every other entry is a vision-tower signal.
INSTRUCTION = "instruction"


class PreLLMStage(ABC):
    """Reduces the visual tokens of each image / video frame before the LLM."""

    #: vision-tower signals this stage reads (e.g. {"cls_attention"}), which the model adapter captures, and
    #: `INSTRUCTION` for the instruction's embeddings.
    needs: frozenset[str] = frozenset()
    #: the reduced tokens keep their original 1-D positions in the LLM (M-RoPE families always keep them)
    original_positions: bool = False
    #: the LLM attends to a token that stands for `size` patches as to `size` copies (+log(size) on its logits)
    proportional_attention: bool = False

    @abstractmethod
    def reduce(self, item: VisualItem) -> VisualItem:
        """Return the item with fewer tokens per frame (order kept, `origin` and `groups` updated)."""

    def for_kind(self, kind: str) -> PreLLMStage:
        """This stage with any per-modality default resolved for inputs of `kind` ("image" / "video"), for
        analytic plans (the runtime resolves them per item). Default: the stage itself."""
        return self

    def planned_tokens(self, tokens_per_frame: int) -> int:
        """Analytic tokens per frame after this stage (estimate for input-dependent stages)."""
        return tokens_per_frame

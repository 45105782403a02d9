"""AIM (Zhong et al., "AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and Pruning",
arXiv 2412.03248), as specified in SPEC section 1.

Two stages:
1. `TokenMerge` (before the LLM): iterative bipartite soft matching per image / video frame on the
   projector output, down to `merge_keep` of the tokens (default: 20% of an image, 25% of a video frame),
   at most `merge_pass_fraction` of a frame's tokens a pass (default a quarter: 196 -> 147 -> 111 -> 84 ->
   63 -> 49; the SPEC's 0.5: 196 -> 98 -> 49).
2. `ProgressivePrune` (inside the LLM): after every layer l in [l1, l2) keep the fraction keep(l) of the
   visual tokens that entered the LLM (linear from 1 to 0), ranked by the attention the question's tokens
   pay to them at that layer, a merged token's log(size) bias included (`importance="text"`, the default,
   measured below) or by the SPEC's PageRank-style multi-modal importance of that layer's attention
   (`importance="pagerank"`: tau 0.1, 5 iterations, RMS over heads); layers >= l2 see no visual token.

Deviations from the published code (SPEC): merged tokens keep raster order (the code leaves unmerged
sources in score order); merging uses the size-weighted mean by default (measured in `ops.merge`);
pruned tokens are physically removed (the code masks them); surviving tokens keep their original RoPE
positions and decoding continues from the original length (the code shifts decode positions).

Defaults that deviate from the SPEC, measured on the bundled real models on held-out data
(docs/methods/aim.md): every frame merges at most a quarter of its tokens a pass instead of half (the
published r = T/2 first pass merges every source token, objects included), and the pruning ranks by the
question's attention instead of PageRank (`importance="pagerank"` gives the published ranking). Images
(`benchmarks/aim_ablation.py`, two draws): AIM went from 0.971 / 0.520 to 0.992 / 0.717 on fresh
easy-VQA-style images / held-out scenes (full model 1.000 / 0.740). Video (the bundled video model, 200
clip questions): 0.520 -> 0.735 (full model 0.730); the quarter schedule alone 0.600, text alone 0.560.
PageRank scores are ranked without float32 underflow ties (`ranking_importance`).

In the LLM a merged token keeps its destination patch's original 1-D position (the text after the image its
own) and is attended as the s patches it stands for (+log(s) on its attention logits, ToMe's proportional
attention): `original_positions` / `proportional_attention`, on the families whose placeholder runs are
their patches (LLaVA-1.5, Gemma 3, InternVL, Idefics3 / SmolVLM; the runtime does both). The AIM code feeds
merged tokens at contiguous positions with plain attention; on the bundled image model that cost the merge
1.7 points on held-out scenes, and with both the merge alone equals the full model (docs/methods/aim.md).

Defaults per modality (`ops.schedule`): video frames merge to 25% and are pruned in the SPEC's window (28
layers -> 14/22); images merge to 20% and are pruned later, between 0.6 L and 0.87 L (30 layers -> 18/26).
On the bundled models (held-out data, docs/methods/aim.md) the SPEC's settings cost images 1.6 / 2.2 points
of held-out scenes at 3.89x, the image ones 0.3 points pooled over three draws at 4.13x; on clips the image
settings cost video 3.0 / 4.5 points where the SPEC's cost -0.5 / 3.0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from leanvlm import flops as flops_model
from leanvlm.methods._frames import frame_signal
from leanvlm.methods.base import LLMStage, Method, PreLLMStage, Selection, check_fraction, keep_count
from leanvlm.ops.importance import CHUNK_ROWS, pagerank_importance, ranking_importance
from leanvlm.ops.merge import merge_schedule, merge_tokens
from leanvlm.ops.schedule import Modality, check_modality, default_merge_keep, progressive_keep, prune_window
from leanvlm.ops.select import pack_right
from leanvlm.runtime.context import LayerContext
from leanvlm.runtime.visual import VisualItem

Importance = Literal["pagerank", "text"]
MergeMetric = Literal["features", "key"]

#: Per-pass merge fraction (measured, docs/methods/aim.md): a pass that removes half of a frame's tokens
#: (the SPEC / published schedule) merges EVERY even-position token into its best match, object or not;
#: merging at most a quarter per pass merges only the most similar pairs (bundled model, held-out data,
#: merge only at 25%: scenes 0.565 -> 0.714, plain 0.740; fresh easy-VQA 0.979 -> 1.000).
PASS_FRACTION = 0.25


@dataclass
class TokenMerge(PreLLMStage):
    """Merge every frame down to `keep` of its tokens by iterative bipartite soft matching.

    keep: None merges to the modality's default (`ops.schedule.default_merge_keep`: images 0.2, video frames
    0.25, by the item's kind). metric: what the similarity is computed on — "features" (the projector output
    itself, SPEC default) or "key" (the key of the vision layer the projector reads, per patch, as the
    published LLaVA-1.5 recipe and ToMe do; SPEC option). weighted: size-weighted mean (default) or plain mean of a merge group.
    original_positions: a merged token keeps its destination patch's 1-D position and the text after the
    image its own (1-D RoPE families; M-RoPE ones always keep them). proportional_attention: every LLM layer
    attends to a token that stands for s patches as to s copies (ToMe's log(s) logit bias). Both apply on
    families whose placeholder runs are exactly the patches (LLaVA-1.5, the grid families, Idefics3 / SmolVLM).
    """

    keep: float | None = None
    weighted: bool = True
    metric: MergeMetric = "features"
    #: at most this fraction of a frame's tokens is merged away per pass (ops.merge.merge_schedule);
    #: 0.5 is the SPEC / published schedule
    pass_fraction: float = PASS_FRACTION
    original_positions: bool = True
    proportional_attention: bool = True

    def __post_init__(self) -> None:
        if self.keep is not None:
            check_fraction("merge_keep", self.keep)
        if self.metric not in ("features", "key"):
            raise ValueError(f"merge metric must be 'features' or 'key', got {self.metric!r}")
        merge_schedule(2, 0.5, self.pass_fraction)  # validates it

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"keys"}) if self.metric == "key" and self.keep != 1.0 else frozenset()

    def keep_for(self, kind: str) -> float:
        """The merge ratio for an item of this kind ("image" / "video")."""
        return default_merge_keep("video" if kind == "video" else "image") if self.keep is None else self.keep

    def for_kind(self, kind: Modality) -> TokenMerge:
        return replace(self, keep=self.keep_for(kind))

    def reduce(self, item: VisualItem) -> VisualItem:
        keep = self.keep_for(item.kind)
        if keep == 1.0:
            return item
        frames, origin, groups = [], [], []
        # Frames with equal token counts are merged as one batch (rows never mix).
        lengths = {f.shape[0] for f in item.frames}
        batches = [list(range(len(item.frames)))] if len(lengths) == 1 else [[i] for i in range(len(item.frames))]
        for rows in batches:
            metric = None
            if self.metric == "key":  # [F, T, D] keys of the current tokens (float32: cosine of small norms)
                metric = torch.stack([frame_signal(item, "keys", i, "AIM's key merge metric") for i in rows]).float()
            result = merge_tokens(torch.stack([item.frames[i] for i in rows]), metric, keep, weighted=self.weighted,
                                  pass_fraction=self.pass_fraction)
            for j, i in enumerate(rows):
                frames.append(result.tokens[j])
                origin.append(item.origin[i][result.kept_indices[j]])
                old = item.groups[i]
                groups.append(torch.where(old >= 0, result.assignment[j][old.clamp(min=0)], old))
        return replace(item, frames=frames, origin=origin, groups=groups)

    def planned_tokens(self, tokens_per_frame: int) -> int:
        # the token count does not depend on the schedule's pass sizes, only on keep (None: the image default;
        # analytics of a video resolve the stage with for_kind("video") first)
        return tokens_per_frame - sum(merge_schedule(tokens_per_frame, self.keep_for("image")))


@dataclass
class ProgressivePrune(LLMStage):
    """After each layer l in [l1, l2), keep round(keep(l) * V) visual tokens (V: visual tokens that
    entered the LLM), chosen by importance. l1/l2 None: `prune_window` of the model's depth and the
    sample's modality (a video sample: its prompt holds the model's video token), or of `modality` if set."""

    l1: int | None = None
    l2: int | None = None
    importance: Importance = "text"
    tau: float = 0.1
    iterations: int = 5
    #: query rows per scoring chunk: peak memory O(chunk_size * N) per head (PageRank builds M once, chunk by
    #: chunk: the runtime's slots are causally ordered)
    chunk_size: int = CHUNK_ROWS
    #: rank by the underflow-free importance (`ops.importance.ranking_importance`); False: the published
    #: code's float32 scores, whose underflowed zeros tie and keep the earliest tokens (for ablations)
    exact_ranking: bool = True
    #: text importance: rank by the attention the model paid, log(size) bias of merged tokens included
    #: (proportional attention); False: the unbiased q/k attention (for ablations)
    size_biased_ranking: bool = True
    #: the modality whose default window applies to every sample (None: each sample's own)
    modality: Modality | None = None

    def __post_init__(self) -> None:
        if self.importance not in ("pagerank", "text"):
            raise ValueError(f"importance must be 'pagerank' or 'text', got {self.importance!r}")
        if self.modality is not None:
            check_modality(self.modality)

    def for_kind(self, kind: Modality) -> ProgressivePrune:
        return self if self.modality is not None else replace(self, modality=kind)

    def resolve(self, num_layers: int, kind: Modality | None = None) -> tuple[int, int]:
        """(l1, l2) for a model of this depth and inputs of this modality (`modality`, when set, wins; neither:
        images), validated."""
        l1, l2 = prune_window(num_layers, self.modality or kind or "image", self.l1, self.l2)
        for name, value in (("l1", l1), ("l2", l2)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int layer index, got {value!r}")
        if not 0 <= l1 < l2 <= num_layers:
            raise ValueError(f"AIM needs 0 <= l1 < l2 <= {num_layers} (the model's depth), got l1={l1}, l2={l2}")
        return l1, l2

    def layers(self, num_layers: int) -> list[int]:
        windows = [self.resolve(num_layers, kind) for kind in ("image", "video")]
        return list(range(min(l1 for l1, _ in windows), max(l2 for _, l2 in windows)))

    def _target(self, layer: int, num_layers: int, visual_into_llm: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        """[B] visual tokens to keep after `layer`: each sample by its modality's window (video [B] bool)."""
        # [image, video] fractions in float64, as flops.kept_count rounds: the runtime keeps the planned counts
        fractions = [progressive_keep(layer, *self.resolve(num_layers, kind)) for kind in ("image", "video")]
        by_kind = torch.tensor(fractions, dtype=torch.float64, device=video.device)
        fraction = by_kind[video.long()]  # [B]
        count = keep_count(fraction, visual_into_llm)
        return torch.where(fraction > 0, count, 0)

    def select(self, ctx: LayerContext) -> Selection:
        candidates = ctx.visual
        available = candidates.sum(dim=1)
        target = self._target(ctx.layer, ctx.num_layers, ctx.visual_into_llm, ctx.layout.video.to(available.device))
        keep = torch.minimum(target, available)
        if bool((keep >= available).all()) or bool((keep == 0).all()):
            # Nothing to rank: everything stays, or every visual token goes.
            return Selection(torch.zeros(candidates.shape, device=candidates.device), candidates, keep)
        if self.importance == "text":
            rows = pack_right(ctx.question)
            scores = ctx.attention_from(rows.clamp(min=0), rows >= 0, chunk_size=self.chunk_size,
                                        key_bias=self.size_biased_ranking)
        else:
            queries, keys, scale = ctx.queries_keys(None)
            options = dict(tau=self.tau, iterations=self.iterations, chunk_size=self.chunk_size)
            if self.exact_ranking:
                scores = ranking_importance(queries, keys, ctx.index, ctx.index, ctx.present, candidates, scale, **options)
            else:
                scores = pagerank_importance(queries, keys, ctx.index, ctx.index, ctx.present, scale, **options)
        return Selection(scores, candidates, keep)

    def planned_keep(self, layer: int, num_layers: int, visual_into_llm: int, visual_now: int) -> int:
        fraction = progressive_keep(layer, *self.resolve(num_layers))
        return min(visual_now, flops_model.kept_count(visual_into_llm, fraction))


@dataclass
class AIM(Method):
    """AIM: merge to `merge_keep` per frame before the LLM, then prune progressively between layers l1
    and l2. None: the modality's default (`ops.schedule`), measured on the bundled models — video frames
    merge to 0.25 and prune between the SPEC's layers (28 layers -> 14/22, 32 -> 13/21, else 0.5 L / 0.79 L),
    images merge to 0.2 and prune between 0.6 L and 0.87 L. `merge_keep=1.0, prune=False` drops nothing.

    `AIM.for_budget(model, flops_ratio=1/7, ...)` picks merge_keep, l1 and l2 for a FLOPs budget.
    """

    merge_keep: float | None = None
    prune: bool = True
    l1: int | None = None
    l2: int | None = None
    importance: Importance = "text"
    weighted_merge: bool = True
    merge_metric: MergeMetric = "features"
    merge_pass_fraction: float = PASS_FRACTION
    original_positions: bool = True
    proportional_attention: bool = True

    def __post_init__(self) -> None:
        self._merge_stage()  # validates merge_keep and the merge options early
        ProgressivePrune(self.l1, self.l2, self.importance)  # validates importance early
        if self.l1 is not None and self.l2 is not None and self.l2 <= self.l1:
            raise ValueError(f"AIM needs l2 > l1, got l1={self.l1}, l2={self.l2}")

    def stages(self) -> tuple[Sequence[PreLLMStage], Sequence[LLMStage]]:
        pre = [self._merge_stage()] if self.merge_keep != 1.0 else []
        llm = [ProgressivePrune(self.l1, self.l2, self.importance)] if self.prune else []
        return pre, llm

    def _merge_stage(self) -> TokenMerge:
        return TokenMerge(self.merge_keep, self.weighted_merge, self.merge_metric, self.merge_pass_fraction,
                          self.original_positions, self.proportional_attention)

    @classmethod
    def for_budget(
        cls,
        model_or_config: Any,
        flops_ratio: float = 1 / 7,
        visual_tokens: int = 576,
        text_tokens: int = 40,
        frames: int = 1,
        tolerance: float = 0.05,
        importance: Importance = "text",
    ) -> AIM:
        """The AIM configuration whose analytic LLM prefill FLOPs are `flops_ratio` of the full model's.

        model_or_config: a model instance, an HF config (object or dict) or a `flops.PRESETS` name.
        visual_tokens: per image / video frame; frames: how many; text_tokens: the rest of the prompt.
        Among configurations within `tolerance` (relative) of the target, prefers the one that keeps the
        most layers intact (largest l1), then the most merged tokens, then the closest. ValueError naming
        the closest achievable ratio when nothing is within tolerance.
        """
        check_fraction("flops_ratio", flops_ratio)
        shape = _llm_shape(model_or_config)
        layers = shape.layers
        base = flops_model.llm_prefill_flops([visual_tokens * frames + text_tokens] * layers, shape)
        target = flops_ratio * base
        best, closest = None, None
        merge_options = sorted({1.0} | {m / 64 for m in range(1, 64)}, reverse=True)
        for merge_keep in merge_options:
            configs = [(l1, l2, True) for l1 in range(layers) for l2 in range(l1 + 1, layers + 1)] + [(layers, layers, False)]
            for l1, l2, prune in configs:
                tokens = flops_model.aim_tokens_per_layer(visual_tokens, frames, text_tokens, layers, merge_keep,
                                                          l1 if prune else None, l2 if prune else None, prune)
                cost = flops_model.llm_prefill_flops(tokens, shape)
                error = abs(cost - target) / target
                key = (-l1, -merge_keep, error)
                if closest is None or error < closest[0]:
                    closest = (error, base / cost)
                if error <= tolerance and (best is None or key < best[0]):
                    best = (key, merge_keep, l1, l2, prune)
        if best is None:
            raise ValueError(
                f"no AIM configuration reaches flops_ratio={flops_ratio:.4g} within {tolerance:.0%}; "
                f"the closest achievable is 1/{closest[1]:.3g} = {1 / closest[1]:.4g}"
            )
        _, merge_keep, l1, l2, prune = best
        return cls(merge_keep=merge_keep, prune=prune, l1=l1 if prune else None, l2=l2 if prune else None,
                   importance=importance)

    def tokens_per_layer(self, model_or_config: Any, visual_tokens: int, text_tokens: int, frames: int = 1,
                         kind: Modality = "image") -> list[int]:
        """Analytic tokens each decoder layer computes on (what leanvlm executes) for `frames` images / crops
        (kind="image") or video frames (kind="video") of `visual_tokens` each."""
        check_modality(kind)
        layers = _llm_shape(model_or_config).layers
        l1, l2 = ProgressivePrune(self.l1, self.l2).resolve(layers, kind) if self.prune else (None, None)
        return flops_model.aim_tokens_per_layer(visual_tokens, frames, text_tokens, layers,
                                                self._merge_stage().keep_for(kind), l1, l2, self.prune)


def _llm_shape(model_or_config: Any) -> flops_model.LLMShape:
    if isinstance(model_or_config, str):
        if model_or_config not in flops_model.PRESETS:
            raise ValueError(f"unknown preset {model_or_config!r}; presets: {', '.join(flops_model.PRESETS)}")
        return flops_model.PRESETS[model_or_config].llm
    config = getattr(model_or_config, "config", model_or_config)
    return flops_model.LLMShape.from_config(config)

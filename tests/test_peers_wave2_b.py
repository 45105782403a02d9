"""Wave-2 video peers: HoliTom (outer-LLM steps and inner-LLM merge) and FastVID.

- Differential tests of the core selection on identical tensors against independent NumPy references
  written here from the papers' definitions: HoliTom's static-window segmentation (brute force over every
  partition of the frames), FastVID's DySeg cuts, DPC-kNN density-peak scores, and both stages end to end;
  HoliTom's inner-LLM merge against the published in-place loop, inside a decoder run by hand.
- The same equivalences as the other peers on the video-capable tiny families (LLaVA-OneVision,
  LLaVA-NeXT-Video, Qwen2-VL): keep=1.0 is the plain model, the token counts are the budget, cached
  decoding equals uncached, a batch equals its samples one by one, the model is restored after exit.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import leanvlm
from leanvlm.methods.fastvid import DensityPrune, FastVID
from leanvlm.methods.holitom import HolisticMerge, HoliTom, SimilarityMerge, inner_merge_layer, pairwise_average_merge
from leanvlm.methods.registry import make_method, method_for_budget
from leanvlm.ops.select import merge_slots
from leanvlm.ops.temporal import (consecutive_similarity, density_peak_scores, pairwise_distances, static_windows,
                                  transition_segments)
from leanvlm.runtime.visual import VisualItem
from test_models import alone, cached, frame_tokens, model_for, prompts
from tiny import IMAGE_TOKEN, PATCHES, batch_inputs, prompt_ids, select, tiny_llava
from tiny_families import FAMILIES
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

GENERATE = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)


# ----------------------------------------------------------------------------------------------- references
def ref_distances(x: np.ndarray) -> np.ndarray:
    """Euclidean distances / sqrt(C), float64."""
    return np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)) / math.sqrt(x.shape[1])


def ref_density_scores(x: np.ndarray, k: int) -> np.ndarray:
    """DPC-kNN (Du et al.): rho_i = exp(-1/k sum over the k nearest (self included) of d^2); delta_i = distance
    to the nearest denser point, the largest distance for the densest; score = rho * delta. Equal densities
    (mutual nearest neighbours at k = 2 have them) count the lower index as denser: leanvlm's documented
    deterministic stand-in for the published code's random noise."""
    d = ref_distances(x)
    rho = np.exp(-np.mean(np.sort(d, axis=1)[:, :k] ** 2, axis=1))

    def denser(j: int, i: int) -> bool:
        return rho[j] > rho[i] + 1e-12 or (abs(rho[j] - rho[i]) <= 1e-12 and j < i)

    delta = np.array([min((d[i, j] for j in range(len(x)) if denser(j, i)), default=d.max()) for i in range(len(x))])
    return rho * delta


def ref_top(scores: np.ndarray, count: int) -> list[int]:
    """Indices of the `count` highest scores (the data are continuous: no ties), ascending."""
    return sorted(np.argsort(-scores, kind="stable")[:count].tolist())


def ref_partitions(frames: int):
    """Every partition of 0..frames-1 into consecutive windows [(start, end), ...]."""
    for cuts in itertools.product([False, True], repeat=frames - 1):
        bounds = [0] + [i + 1 for i, cut in enumerate(cuts) if cut] + [frames]
        yield [(a, b - 1) for a, b in zip(bounds, bounds[1:])]


def ref_static(frames: np.ndarray, start: int, end: int, tau: float) -> np.ndarray:
    """Positions whose cosine between every pair of consecutive frames of [start, end] exceeds tau."""
    unit = frames / np.linalg.norm(frames, axis=-1, keepdims=True)
    mask = np.ones(frames.shape[1], dtype=bool)
    for t in range(start, end):
        mask &= (unit[t] * unit[t + 1]).sum(-1) > tau
    return mask


def ref_best_windows(frames: np.ndarray, tau: float) -> tuple[list[tuple[int, int]], int, int]:
    """(best partition, tokens it removes, how many partitions tie with it) by brute force. Among partitions
    removing equally many, the one with the most windows wins (a window that removes nothing stays split)."""
    scored = [(sum(int(ref_static(frames, a, b, tau).sum()) * (b - a) for a, b in p if b > a), len(p), p)
              for p in ref_partitions(frames.shape[0])]
    best = max((s, n) for s, n, _ in scored)
    winners = [p for s, n, p in scored if (s, n) == best]
    return winners[0], best[0], len(winners)


def ref_cluster(x: np.ndarray, centres: int, k: int, beta: float) -> dict[int, np.ndarray]:
    """HoliTom's merge: density-peak centres, others to the nearest centre (Euclidean), centre with
    members -> beta * centre + (1 - beta) * mean(members). -> {index of the centre in x: token}."""
    if centres == 0:
        return {}
    chosen = ref_top(ref_density_scores(x, min(k, centres)), centres)
    d = ref_distances(x)
    out = {}
    members = {c: [] for c in chosen}
    for i in range(len(x)):
        if i not in members:
            members[chosen[int(np.argmin(d[i, chosen]))]].append(i)
    for c in chosen:
        out[c] = beta * x[c] + (1 - beta) * x[members[c]].mean(0) if members[c] else x[c]
    return out


def ref_holitom(frames: np.ndarray, attention: np.ndarray, keep: float, tau: float, beta: float, share: float,
                k: int) -> list[dict[int, np.ndarray]]:
    """The HoliTom outer-LLM algorithm on one video [F, T, C] -> per frame {patch: output token}."""
    count, tokens, _ = frames.shape
    windows, removed, _ = ref_best_windows(frames, tau)
    ratio = min(1.0, keep * count * tokens / (count * tokens - removed))
    out: list[dict[int, np.ndarray]] = [{} for _ in range(count)]
    for a, b in windows:
        static = ref_static(frames, a, b, tau) if b > a else np.zeros(tokens, dtype=bool)
        positions = np.nonzero(static)[0]
        if len(positions):
            merged = ref_cluster(frames[a:b + 1, positions].mean(0), round(len(positions) * ratio), k, beta)
            out[a].update({int(positions[c]): v for c, v in merged.items()})
        dynamic = np.nonzero(~static)[0]
        for f in range(a, b + 1):
            kept = math.ceil(len(dynamic) * ratio)
            dominant_count = round(kept * (1 - share))
            dominant = dynamic[np.argsort(-attention[f, dynamic], kind="stable")[:dominant_count]]
            out[f].update({int(p): frames[f, p] for p in dominant})
            rest = np.array([p for p in dynamic if p not in set(dominant.tolist())])
            if kept - dominant_count > 0:
                merged = ref_cluster(frames[f, rest], kept - dominant_count, k, beta)
                out[f].update({int(rest[c]): v for c, v in merged.items()})
    return out


def ref_dyseg(features: np.ndarray, c: int, tau: float) -> list[int]:
    """FastVID DySeg: cuts at the c - 1 least similar transitions and every one below tau -> lengths."""
    unit = features / np.linalg.norm(features, axis=-1, keepdims=True)
    similarity = (unit[:-1] * unit[1:]).sum(-1)
    cuts = set(np.argsort(similarity, kind="stable")[:min(c - 1, len(similarity))].tolist())
    cuts |= set(np.nonzero(similarity < tau)[0].tolist())
    bounds = [-1, *sorted(cuts), len(features) - 1]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def ref_fastvid(frames: np.ndarray, attention: np.ndarray, keep: float, c: int, tau: float, d: float, p: int,
                beta: float, k: int) -> list[dict[int, np.ndarray]]:
    """FastVID's STPrune on one video [F, T, C] (paper definitions) -> per frame {patch: output token}."""
    count, tokens, _ = frames.shape
    retained = max(1, math.floor(tokens * keep))
    salient_count = math.floor(d * retained)
    contextual = retained - salient_count
    out: list[dict[int, np.ndarray]] = [{} for _ in range(count)]
    rest = []
    for f in range(count):
        salient = np.argsort(-attention[f], kind="stable")[:salient_count]
        out[f].update({int(i): frames[f, i] for i in salient})
        rest.append([i for i in range(tokens) if i not in set(salient.tolist())])
    start = 0
    for length in ref_dyseg(frames.mean(1), c, tau):
        anchors = list(range(start, start + length, p))
        per_anchor = min(length * contextual // len(anchors), len(rest[0]))
        anchor_list = []  # (frame, patch, vector)
        for f in anchors:
            scores = ref_density_scores(frames[f, rest[f]], min(k, len(rest[f])))
            anchor_list += [(f, rest[f][i], frames[f, rest[f][i]]) for i in ref_top(scores, per_anchor)]
        if not anchor_list:
            start += length
            continue
        vectors = np.stack([v for _, _, v in anchor_list])
        unit_anchor = vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)
        joined = {i: [] for i in range(len(anchor_list))}
        for g in range(start, start + length):
            for patch in rest[g]:
                x = frames[g, patch]
                joined[int(np.argmax(unit_anchor @ (x / np.linalg.norm(x))))].append(x)
        for i, (f, patch, vector) in enumerate(anchor_list):
            alpha = max(1 / (len(joined[i]) + 1), beta)
            out[f][int(patch)] = alpha * vector + (1 - alpha) * np.mean(joined[i], axis=0)
        start += length
    return out


def assert_item_matches(item: VisualItem, expected: list[dict[int, np.ndarray]]) -> None:
    for f, want in enumerate(expected):
        assert item.origin[f].tolist() == sorted(want), f"frame {f}"
        if want:
            np.testing.assert_allclose(item.frames[f].double().numpy(), np.stack([want[p] for p in sorted(want)]),
                                       rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- ops vs references
def redundant_video(seed: int, frames: int = 6, tokens: int = 12, channels: int = 8) -> torch.Tensor:
    """Frames 0-2 and 4-5 share most patches (small noise), frame 3 is new; every frame has some moving
    patches (so which windows pay off depends on the seed)."""
    g = torch.Generator().manual_seed(seed)
    scenes = torch.randn(2, tokens, channels, generator=g, dtype=torch.float64)
    video = torch.empty(frames, tokens, channels, dtype=torch.float64)
    for f in range(frames):
        new_scene = torch.randn(tokens, channels, generator=g, dtype=torch.float64)
        base = scenes[0] if f < 3 else new_scene if f == 3 else scenes[1]
        video[f] = base + 0.05 * torch.randn(tokens, channels, generator=g, dtype=torch.float64)
        moving = torch.randperm(tokens, generator=g)[:3 + f % 3]
        video[f, moving] = torch.randn(len(moving), channels, generator=g, dtype=torch.float64)
    return video


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_static_windows_equal_the_brute_force_optimum(seed):
    video = redundant_video(seed)
    windows, removed = static_windows(consecutive_similarity(video), 0.9, max_window=1024)
    best, best_removed, winners = ref_best_windows(video.numpy(), 0.9)
    assert winners == 1, "the test video must have one best partition"
    assert (windows, removed) == (best, best_removed) and removed > 0
    assert len(windows) < 6 and (3, 3) in windows  # some windows merge; frame 3 (a new scene) stays alone
    # random frames: no redundancy, every frame alone; max_window=1 forbids windows whatever the data
    noise = torch.randn(5, 7, 64, generator=torch.Generator().manual_seed(seed))
    assert static_windows(consecutive_similarity(noise), 0.9, 1024) == ([(t, t) for t in range(5)], 0)
    assert static_windows(consecutive_similarity(video), 0.9, 1) == ([(t, t) for t in range(6)], 0)


@pytest.mark.parametrize("seed", range(4))
def test_transition_segments_equal_the_reference(seed):
    g = torch.Generator().manual_seed(seed)
    shared = 2.0 * torch.randn(6, generator=g, dtype=torch.float64)  # frames alike, some transitions above tau
    features = torch.randn(10, 6, generator=g, dtype=torch.float64) + shared
    for c, tau in [(1, 0.0), (3, 0.5), (4, 0.9), (8, -1.0), (20, 0.0)]:
        lengths = transition_segments(features, c, tau)
        assert lengths == ref_dyseg(features.numpy(), c, tau), (c, tau)
        assert sum(lengths) == 10 and len(lengths) >= min(c, 10)


@pytest.mark.parametrize("seed", range(3))
def test_pairwise_distances_equal_the_direct_differences(seed):
    """The Gram-matrix distances are as accurate as float32 allows, near-duplicates and an offset included."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 40, 64, generator=g) + 50.0  # a large common offset: the Gram form's worst case
    x[:, 1] = x[:, 0] + 1e-4 * torch.randn(3, 64, generator=g)  # near-duplicates
    x[:, 2] = x[:, 0]  # an exact duplicate
    want = ref_distances_batch(x.double())
    got = pairwise_distances(x)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.double().numpy(), want.numpy(), rtol=1e-6, atol=1e-9)
    assert bool((got.diagonal(dim1=1, dim2=2) == 0).all()) and bool((got[:, 0, 2] == 0).all())
    assert bool((got[:, 0, 1] > 0).all())


def ref_distances_batch(x: torch.Tensor) -> torch.Tensor:
    """Direct differences: |x_i - x_j| / sqrt(C), x [B, N, C] float64."""
    return (x[:, :, None] - x[:, None, :]).norm(dim=-1) / math.sqrt(x.shape[-1])


@pytest.mark.parametrize("seed", range(3))
def test_density_peak_scores_equal_the_reference(seed):
    x = torch.randn(2, 15, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for k in (2, 4, 7):
        scores, _ = density_peak_scores(x, k)
        for b in range(2):
            want = ref_density_scores(x[b].numpy(), k)
            np.testing.assert_allclose(scores[b].numpy(), want, rtol=1e-10)
            assert ref_top(scores[b].numpy(), 5) == ref_top(want, 5)
    # k = 1 (itself only): every density is 1; equal densities order by index, the first counts as densest
    scores, distances = density_peak_scores(x, 1)
    d = ref_distances(x[0].numpy())
    want = [d.max()] + [d[i, :i].min() for i in range(1, 15)]
    np.testing.assert_allclose(scores[0].numpy(), want, rtol=1e-10)
    with pytest.raises(ValueError, match="need 1 <= k <= 15 tokens, got k=16"):
        density_peak_scores(x, 16)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("keep", "share"), [(0.3, 0.0), (0.5, 0.5), (0.15, 1.0)])
def test_holitom_stage_equals_the_reference(seed, keep, share):
    video = redundant_video(seed)
    attention = torch.rand(6, 12, generator=torch.Generator().manual_seed(10 + seed), dtype=torch.float64)
    item = VisualItem.from_frames(video, (3, 4), 0, "video", {"cls_attention": attention})
    out = HolisticMerge(keep=keep, tau=0.9, beta=0.6, contextual_share=share, k=3).reduce(item)
    assert_item_matches(out, ref_holitom(video.numpy(), attention.numpy(), keep, 0.9, 0.6, share, 3))
    # later frames of a window hand their static patches to its first frame: none of their own tokens holds them
    windows = [(a, b) for a, b in ref_best_windows(video.numpy(), 0.9)[0] if b > a]
    assert windows
    for a, b in windows:
        static = torch.from_numpy(ref_static(video.numpy(), a, b, 0.9))
        assert static.any() and all(bool(out.groups[f][static].eq(-1).all()) for f in range(a + 1, b + 1))


def ref_in_place_merge(hidden: np.ndarray, sources: list[int], targets: list[int]) -> np.ndarray:
    """The published inner-LLM merge, literally: similarities of the unmerged states first; then, source by
    source in ascending position, its most cosine-similar target t (first on ties): h[t] = (h[t] + h[s]) / 2."""
    unit = hidden / np.linalg.norm(hidden, axis=1, keepdims=True)
    nearest = {s: targets[int(np.argmax([unit[s] @ unit[t] for t in targets]))] for s in sources}
    merged = hidden.copy()
    for source in sorted(sources):
        merged[nearest[source]] = (merged[nearest[source]] + merged[source]) / 2
    return merged


@pytest.mark.parametrize("seed", range(4))
def test_pairwise_average_merge_equals_the_in_place_loop(seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(20, 6, generator=g, dtype=torch.float64)
    hidden[1:] += 2 * hidden[:1]  # a shared direction: several sources pick the same target
    targets = sorted(torch.randperm(20, generator=g)[:5].tolist())
    sources = [i for i in range(20) if i not in targets]
    nearest, source_weight, target_weight = pairwise_average_merge(hidden[sources], hidden[targets])
    assert torch.bincount(nearest).max() >= 3  # some target has a long chain of halvings
    got = hidden[targets] * target_weight[:, None].double()
    got = got.index_add(0, nearest, hidden[sources] * source_weight[:, None].double())
    np.testing.assert_allclose(got.numpy(), ref_in_place_merge(hidden.numpy(), sources, targets)[targets], rtol=1e-6)


def test_merge_slots_folds_into_targets_and_leaves_the_rest_bit_exact():
    values = torch.randn(2, 5, 3, dtype=torch.float16)
    # row 0: slots 1 and 3 fold into 2 (which keeps a quarter of itself); row 1: nothing merges
    target = torch.tensor([[-1, 2, 2, 2, -1], [-1] * 5])
    weight = torch.tensor([[0.0, 0.25, 0.25, 0.5, 0.0], [0.0] * 5])
    out = merge_slots(values, target, weight)
    expected = (0.25 * values[0, 1].float() + 0.25 * values[0, 2].float() + 0.5 * values[0, 3].float()).half()
    assert torch.equal(out[0, 2], expected) and out.dtype == torch.float16
    untouched = torch.tensor([[True, True, False, True, True], [True] * 5])
    assert torch.equal(out[untouched], values[untouched])


def ref_inner_merge_logits(model, inputs: dict, layer: int, keep: float) -> torch.Tensor:
    """HoliTom's inner merge by hand on a tiny LLaVA (one prompt, no padding): run the decoder layers one by
    one; after `layer`, keep the round(keep * V) visual tokens the last token attends to most (that layer's
    q / k on its input, head-averaged), fold the rest in with `ref_in_place_merge` on the layer's output,
    drop them, and run the later layers on the kept tokens at their original positions. -> last logits [1, V]."""
    lm = model.model.language_model
    ids = inputs["input_ids"]
    hidden = lm.embed_tokens(ids)
    features = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output
    hidden[ids == IMAGE_TOKEN] = torch.cat(list(features))
    positions = torch.arange(ids.shape[1])[None]
    eager = model.config._attn_implementation == "eager"

    def causal(pos: torch.Tensor) -> torch.Tensor:
        allowed = pos[0][None, :] <= pos[0][:, None]
        return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None] if eager else allowed[None, None]

    rope = lm.rotary_emb(hidden, positions)
    for i in range(layer + 1):
        if i == layer:
            attn = lm.layers[i].self_attn
            x = lm.layers[i].input_layernorm(hidden)
            q = attn.q_proj(x).view(1, x.shape[1], -1, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(1, x.shape[1], -1, attn.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, *rope)
            last = torch.softmax(q[:, :, -1:] @ repeat_kv(k, attn.num_key_value_groups).transpose(-1, -2) * attn.scaling, -1)
            scores = last.mean(dim=1)[0, 0]  # [N]
        hidden = lm.layers[i](hidden, attention_mask=causal(positions), position_embeddings=rope, position_ids=positions)
    visual = (ids[0] == IMAGE_TOKEN).nonzero().squeeze(1)
    top = visual[scores[visual].topk(max(1, round(keep * visual.numel()))).indices]
    targets = sorted(top.tolist())
    sources = [i for i in visual.tolist() if i not in targets]
    hidden = torch.from_numpy(ref_in_place_merge(hidden[0].double().numpy(), sources, targets)).float()[None]
    kept = torch.tensor(sorted(set(range(ids.shape[1])) - set(sources)))
    hidden, positions = hidden[:, kept], positions[:, kept]
    rope = lm.rotary_emb(hidden, positions)
    for i in range(layer + 1, len(lm.layers)):
        hidden = lm.layers[i](hidden, attention_mask=causal(positions), position_embeddings=rope, position_ids=positions)
    return model.lm_head(lm.norm(hidden))[:, -1]


@pytest.mark.parametrize(("text", "attn"), [("llama", "sdpa"), ("qwen2", "eager")])
@pytest.mark.parametrize(("layer", "keep"), [(2, 0.5), (0, 0.25)])
def test_inner_merge_matches_the_hand_reference(text, attn, layer, keep):
    model = tiny_llava(text, attn)
    inputs = batch_inputs([prompt_ids(4, 6, seed=3)], seed=5)
    with torch.no_grad():
        expected = ref_inner_merge_logits(model, inputs, layer, keep)
    for method in (leanvlm.Compose(llm=[SimilarityMerge(layer, keep)]), HoliTom(keep=1.0, inner_layer=layer, inner_keep=keep)):
        with method.apply(model):
            logits = model(**inputs).logits[:, -1]
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
        kept = max(1, round(keep * PATCHES))
        assert method.stats.samples[0].layer_visual_tokens == [PATCHES] * (layer + 1) + [kept] * (5 - layer)
    with leanvlm.FastV(layer=layer, keep=keep).apply(model):  # the same tokens kept, without the merge
        assert not torch.allclose(model(**inputs).logits[:, -1], expected, atol=1e-3)


def test_inner_merge_cached_uncached_and_batch_on_llava():
    model = tiny_llava("qwen2", "eager")
    inputs = batch_inputs([prompt_ids(3, 5, seed=7), prompt_ids(2, 9, seed=8)], seed=9)
    method = HoliTom(keep=0.5, inner_layer=1)
    with method.apply(model):
        batch_logits = model(**inputs).logits[:, -1]
        with_cache = model.generate(**inputs, max_new_tokens=6, **GENERATE)
        without = model.generate(**inputs, max_new_tokens=6, use_cache=False, **GENERATE)
        for row in range(2):
            torch.testing.assert_close(model(**select(inputs, row)).logits[:, -1], batch_logits[row:row + 1],
                                       atol=1e-4, rtol=1e-4)
    assert torch.equal(with_cache.sequences, without.sequences)
    for a, b in zip(with_cache.logits, without.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_inner_merge_that_drops_nothing_is_the_plain_model():
    model = tiny_llava("llama", "sdpa")
    inputs = batch_inputs([prompt_ids(3, 5, seed=1), prompt_ids(1, 8, seed=2)])
    plain = model(**inputs).logits
    for method in (HoliTom(keep=1.0, inner_keep=1.0), leanvlm.Compose(llm=[SimilarityMerge(2, 1.0)])):
        with method.apply(model):
            torch.testing.assert_close(model(**inputs).logits, plain, atol=0, rtol=0)
    text_only = {"input_ids": torch.tensor([[5, 9, 17, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    plain_text = model(**text_only).logits
    with HoliTom().apply(model):  # no visual token: nothing to merge
        torch.testing.assert_close(model(**text_only).logits, plain_text, atol=0, rtol=0)
    assert HoliTom(inner_keep=1.0).stages()[1] == ()


def test_inner_merge_layer_and_budget():
    assert [inner_merge_layer(n) for n in (28, 24, 32, 6, 4, 2)] == [17, 14, 20, 3, 2, 0]  # 28: the published K = 18
    with pytest.raises(ValueError, match="at least 2 decoder layers"):
        inner_merge_layer(1)
    # 28 layers, l = 17: layers 0..17 see keep * V, the other 10 half of it
    options = HoliTom.budget_options(0.25, 28)
    assert options == {"keep": pytest.approx(0.25 * 28 / (18 + 10 * 0.5)), "inner_keep": 0.5}
    high = HoliTom.budget_options(0.9, 28)
    assert high["keep"] == 1.0 and (18 + 10 * high["inner_keep"]) / 28 == pytest.approx(0.9)


def scene_video(seed: int, frames: int = 7, tokens: int = 16, channels: int = 8) -> torch.Tensor:
    """Two scenes (frames 0-3 and 4-6), each with its own strong mean direction, so the frames' global
    features are similar within a scene and not across; small per-frame noise, a few moving patches."""
    g = torch.Generator().manual_seed(seed)
    scenes = [torch.randn(tokens, channels, generator=g, dtype=torch.float64)
              + 3 * torch.randn(channels, generator=g, dtype=torch.float64) for _ in range(2)]
    video = torch.stack([scenes[f >= 4] + 0.3 * torch.randn(tokens, channels, generator=g, dtype=torch.float64)
                         for f in range(frames)])
    for f in range(frames):
        video[f, torch.randperm(tokens, generator=g)[:2]] += torch.randn(2, channels, generator=g, dtype=torch.float64)
    return video


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("keep", "c", "tau", "p"), [(0.5, 2, 0.9, 2), (0.25, 1, 0.99, 4), (0.4, 8, 0.9, 4)])
def test_fastvid_stage_equals_the_reference(seed, keep, c, tau, p):
    video = scene_video(seed)
    attention = torch.rand(7, 16, generator=torch.Generator().manual_seed(20 + seed), dtype=torch.float64)
    item = VisualItem.from_frames(video, (4, 4), 0, "video", {"cls_attention": attention})
    stage = DensityPrune(keep=keep, min_segments=c, tau=tau, salient_share=0.4, anchor_step=p, beta=0.6, k=4)
    out = stage.reduce(item)
    assert_item_matches(out, ref_fastvid(video.numpy(), attention.numpy(), keep, c, tau, 0.4, p, 0.6, 4))
    lengths = transition_segments(video.mean(dim=1), c, tau)
    if c <= 2:  # the scene cut alone: two multi-frame segments, whose non-anchor frames keep only ATS tokens
        assert lengths == [4, 3]
        salient = math.floor(0.4 * max(1, math.floor(16 * keep)))
        assert [len(o) for o in out.origin][1] == salient


def test_image_is_one_segment_spatial_only():
    x = torch.randn(1, 16, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    attention = torch.rand(1, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    item = VisualItem.from_frames(x, (4, 4), 0, "image", {"cls_attention": attention})
    holi = HolisticMerge(keep=0.25).reduce(item)
    assert holi.origin[0].tolist() == sorted(torch.topk(attention[0], 4).indices.tolist())  # D = 0: attention top-k
    assert torch.equal(holi.frames[0], x[0, holi.origin[0]])
    fast = DensityPrune(keep=0.5).reduce(item)  # R = 8: 3 by attention + 5 density-peak merges of the rest
    assert_item_matches(fast, ref_fastvid(x.numpy(), attention.numpy(), 0.5, 8, 0.9, 0.4, 4, 0.6, 4))


def test_misaligned_frames_are_a_clear_error():
    x = torch.randn(2, 9, 4)
    item = VisualItem.from_frames(x, (3, 3), 0, "video", {"cls_attention": torch.rand(2, 9)})
    ragged = item.select([torch.arange(9), torch.arange(5)])
    with pytest.raises(ValueError, match="HoliTom needs position-aligned frames"):
        HolisticMerge(keep=0.5).reduce(ragged)
    with pytest.raises(ValueError, match=r"FastVID needs the same token count in every frame of a video, got \[9, 5\]"):
        DensityPrune(keep=0.5).reduce(ragged)
    with pytest.raises(ValueError, match="HoliTom needs the vision-tower signal 'cls_attention'"):
        HolisticMerge(keep=0.5).reduce(VisualItem.from_frames(x, (3, 3), 0, "video"))


@pytest.mark.parametrize(("build", "message"), [
    (lambda: HoliTom(keep=0), r"keep must be in \(0, 1\], got 0"),
    (lambda: HoliTom(tau=1.5), r"tau must be a cosine similarity in \[-1, 1\] or None, got 1.5"),
    (lambda: HoliTom(k=0), "k must be an int >= 1, got 0"),
    (lambda: HoliTom(contextual_share=2), r"contextual_share must be in \[0, 1\], got 2"),
    (lambda: HoliTom(inner_keep=0), r"inner_keep must be in \(0, 1\], got 0"),
    (lambda: HoliTom(inner_layer=-1), "inner_layer must be a decoder layer index >= 0 or None, got -1"),
    (lambda: FastVID(keep=1.2), r"keep must be in \(0, 1\], got 1.2"),
    (lambda: FastVID(anchor_step=0), "anchor_step must be an int >= 1, got 0"),
    (lambda: FastVID(min_segments=2.5), "min_segments must be an int >= 1, got 2.5"),
    (lambda: FastVID(tau="high"), "tau must be a cosine similarity in \\[-1, 1\\], got 'high'"),
    (lambda: FastVID(salient_share=-0.1), r"salient_share must be in \[0, 1\], got -0.1"),
])
def test_bad_options_are_clear_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_lmms_eval_model_args_reach_the_methods():
    from leanvlm.integrations.lmms_eval import split_method_args

    args = {"pretrained": "x", "method": "holitom", "keep": "0.15", "tau": "0.7", "max_frames_num": "32"}
    assert split_method_args(args) == ("holitom", {"keep": 0.15, "tau": 0.7}, None, None)
    assert args == {"pretrained": "x", "max_frames_num": "32"}
    assert split_method_args({"method": "fastvid", "budget": "0.1", "anchor_step": "2"}) == (
        "fastvid", {"anchor_step": 2}, 0.1, None)


def test_registry_budget_and_defaults():
    assert make_method("holitom") == HoliTom() and make_method("FastVID", keep=0.2) == FastVID(keep=0.2)
    assert method_for_budget("holitom", 0.25, 28) == HoliTom(keep=0.25 * 28 / 23, inner_keep=0.5)
    assert method_for_budget("fastvid", 0.1, 28) == FastVID(keep=0.1)
    assert HolisticMerge(keep=0.1).threshold == 0.65 and HolisticMerge(keep=0.15).threshold == 0.8  # published scripts
    assert leanvlm.HoliTom is HoliTom and leanvlm.FastVID is FastVID
    # analytic plan of a 196-token frame (LLaVA-OneVision-7B) at 10%: 20 and 19 tokens
    assert HolisticMerge(keep=0.1).planned_tokens(196) == 20 and DensityPrune(keep=0.1).planned_tokens(196) == 19


# ----------------------------------------------------------------------------------------------- on the models
VIDEO_FAMILIES = ["llava_onevision", "llava_next_video", "qwen2_vl"]
CASES = [("holitom", lambda: HoliTom(keep=0.5)), ("fastvid", lambda: FastVID(keep=0.5))]
CASE = dict(CASES)
# (family, modality): videos on every video family, images and mixed batches on LLaVA-OneVision / Qwen2-VL
CELLS = [(f, "video") for f in VIDEO_FAMILIES] + [("llava_onevision", "mixed"), ("qwen2_vl", "image")]


def inputs_for(family: str, modality: str, attn: str = "sdpa"):
    fam = FAMILIES[family]
    model = model_for(family, attn)
    samples = prompts(fam, modality)
    return fam, model, samples, cached(("inputs", family, modality), lambda: fam.inputs(model, samples))


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_keep_all_is_the_plain_model_and_everything_is_restored(family):
    fam, model, samples, inputs = inputs_for(family, "video")
    plain = model(**inputs).logits
    hooks = [(m._forward_hooks.copy(), m._forward_pre_hooks.copy()) for m in model.modules()]
    for method in (HoliTom(keep=1.0, inner_keep=1.0), FastVID(keep=1.0)):
        with method.apply(model):
            torch.testing.assert_close(model(**inputs).logits, plain, atol=1e-5, rtol=0)
        assert [s.visual_into_llm for s in method.stats.samples] == [s.visual_in for s in method.stats.samples]
    with pytest.raises(RuntimeError, match="boom"), HoliTom(keep=0.5).apply(model):
        raise RuntimeError("boom")
    assert [(m._forward_hooks, m._forward_pre_hooks) for m in model.modules()] == hooks
    assert torch.equal(model(**inputs).logits, plain)


@pytest.mark.parametrize(("family", "modality"), CELLS)
def test_token_counts_are_the_budget(family, modality):
    fam, model, samples, inputs = inputs_for(family, modality)
    for name, make in CASES:
        method = make()
        with method.apply(model):
            logits = model(**inputs).logits
        assert not torch.allclose(logits[:, -1], model(**inputs).logits[:, -1], atol=1e-4)
        for row, sample in enumerate(method.stats.samples):
            into = sample.visual_into_llm
            # HoliTom's inner merge after layer 2 of 4 (the published 18 of 28) keeps half
            inner = [max(1, round(0.5 * into))] if name == "holitom" else [into]
            assert sample.layer_visual_tokens == [into] * 3 + inner
            if modality == "video" and name == "fastvid":
                # 3 (LLaVA) / 2 (Qwen) frames, fewer than c = 8: every frame is its own segment and keeps R exactly
                frames = frame_tokens(fam, model, samples[row])
                assert sample.visual_into_llm == sum(max(1, math.floor(t * 0.5)) for t in frames)
            else:  # HoliTom: about half of every item; FastVID on images: half of every frame
                assert abs(sample.visual_into_llm - 0.5 * sample.visual_in) <= 4, (name, sample.visual_in,
                                                                                   sample.visual_into_llm)


@pytest.mark.parametrize(("family", "modality", "attn"), [(f, m, "sdpa") for f, m in CELLS[:3]]
                         + [("llava_onevision", "mixed", "eager")])
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_cached_decode_equals_uncached(family, modality, attn, name):
    fam, model, samples, inputs = inputs_for(family, modality, attn)
    method = CASE[name]()
    with method.apply(model):
        with_cache = model.generate(**inputs, max_new_tokens=6, **GENERATE)
        without = model.generate(**inputs, max_new_tokens=6, use_cache=False, **GENERATE)
    assert torch.equal(with_cache.sequences, without.sequences)
    for a, b in zip(with_cache.logits, without.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("family", "modality"), CELLS)
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_batch_equals_samples_one_by_one(family, modality, name):
    fam, model, samples, inputs = inputs_for(family, modality)
    method = CASE[name]()
    with method.apply(model):
        batch_logits = model(**inputs).logits[:, -1]
        batch_counts = [s.visual_into_llm for s in method.stats.samples]
        batch_tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)[:, -3:]
        for row in range(len(samples)):
            single = cached(("alone", family, modality, row), lambda: alone(fam, model, samples, row))
            torch.testing.assert_close(model(**single).logits[:, -1], batch_logits[row:row + 1], atol=1e-4, rtol=1e-4)
            assert method.stats.samples[0].visual_into_llm == batch_counts[row]
            alone_tokens = model.generate(**single, max_new_tokens=3, do_sample=False)[0, -3:]
            assert alone_tokens.tolist() == batch_tokens[row].tolist()

"""Peers, wave 2 (images): DivPrune, CDPruner, VisPruner, DART.

1. The equivalences of every peer (keep=1.0 exact, the promised counts, cached == uncached, batch == samples
   one by one, hooks restored) on every supported family, with the tiny models of `tiny_families` (LLaVA-NeXT-Video
   and Qwen2.5-VL only under `pytest -m peers_matrix`, see DEFAULT_FAMILIES).
2. Differential tests of each core selection against an independent reference written here from the
   papers' maths (plain Python / brute force, never the library's code path), on identical tensors.
"""

from __future__ import annotations

import math

import pytest
import torch

import leanvlm
import test_models as matrix
from leanvlm.methods.cdpruner import ConditionalDPP, instruction_relevance
from leanvlm.methods.dart import dart_keep, pivot_quotas
from leanvlm.methods.divprune import DiverseSubset, frame_keep_count
from leanvlm.methods.registry import METHODS, budget_options, make_method
from leanvlm.methods.vispruner import ImportantDiverse
from leanvlm.ops.diversity import dissimilar_to_pivots, dpp_greedy_map, max_min_diverse, remove_duplicates
from leanvlm.runtime.visual import VisualItem
from tiny_families import FAMILIES

LAYERS = matrix.LAYERS  # 4 decoder layers
PRE_LLM = {"divprune": 0.25, "cdpruner": 0.25, "vispruner": 0.5}  # name -> keep used below
DART_LAYER, DART_KEEP = 1, 0.25


def reducing(name: str) -> leanvlm.Method:
    if name == "dart":
        return leanvlm.DART(layer=DART_LAYER, keep=DART_KEEP)
    return make_method(name, keep=PRE_LLM[name])


def modality(family: str) -> str:
    """Images and videos in one batch where the family takes both, else images."""
    return "mixed" if FAMILIES[family].mixed else "image"


def setup(family: str):
    fam = FAMILIES[family]
    model = matrix.model_for(family, "sdpa")
    samples = matrix.prompts(fam, modality(family))
    inputs = matrix.cached(("inputs", family, modality(family)), lambda: fam.inputs(model, samples))
    return fam, model, samples, inputs


def expected_layers(name: str, frames: list[int]) -> list[int]:
    """Visual tokens every decoder layer computes on, from the tokens of every frame of the sample."""
    if name == "dart":
        total = sum(frames)
        return [total] * (DART_LAYER + 1) + [max(1, round(DART_KEEP * total))] * (LAYERS - DART_LAYER - 1)
    return [sum(frame_keep_count(PRE_LLM[name], t) for t in frames)] * LAYERS


NAMES = ["divprune", "cdpruner", "vispruner", "dart"]
# CLIP with CLS (llava), SigLIP without CLS + anyres tiles + video (onevision), packed Qwen tower with M-RoPE
# (qwen2_vl) run by default; the other families are marked `peers_matrix` (run by .ci/run) to keep the
# default suite short.
DEFAULT_FAMILIES = ("llava", "llava_onevision", "qwen2_vl")
CELLS = [pytest.param(family, name, marks=() if family in DEFAULT_FAMILIES else pytest.mark.peers_matrix)
         for family in FAMILIES for name in NAMES]


# ----------------------------------------------------------------------------------------------- equivalences
@pytest.mark.parametrize(("family", "name"), CELLS)
def test_keep_all_is_the_plain_model_and_hooks_are_restored(family, name):
    fam, model, samples, inputs = setup(family)
    plain = matrix.plain_logits(family, modality(family), "sdpa", model, inputs)
    hooks = [(m._forward_hooks.copy(), m._forward_pre_hooks.copy()) for m in model.modules()]
    method = METHODS[name](keep=1.0)
    with method.apply(model):
        kept = model(**inputs).logits
    torch.testing.assert_close(kept, plain, atol=1e-5, rtol=0)
    assert [(m._forward_hooks, m._forward_pre_hooks) for m in model.modules()] == hooks
    assert "generate" not in vars(model)
    with reducing(name).apply(model):
        assert not torch.allclose(model(**inputs).logits[:, -1], plain[:, -1], atol=1e-4)
    assert [(m._forward_hooks, m._forward_pre_hooks) for m in model.modules()] == hooks
    torch.testing.assert_close(model(**inputs).logits, plain, atol=0, rtol=0)  # the model is as before


@pytest.mark.parametrize(("family", "name"), CELLS)
def test_counts_and_cached_generate_equals_uncached(family, name):
    fam, model, samples, inputs = setup(family)
    method = reducing(name)
    with method.apply(model):
        model(**inputs)
        for row, sample in enumerate(method.stats.samples):
            frames = matrix.cached(("frames", family, modality(family), row),
                                   lambda: matrix.frame_tokens(fam, model, samples[row]))
            assert sample.visual_in == sum(frames)
            assert sample.layer_visual_tokens == expected_layers(name, frames)
        cached = model.generate(**inputs, max_new_tokens=6, **matrix.GENERATE)
        uncached = model.generate(**inputs, max_new_tokens=6, use_cache=False, **matrix.GENERATE)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("family", "name"), CELLS)
def test_batch_equals_samples_one_by_one(family, name):
    fam, model, samples, inputs = setup(family)
    method = reducing(name)
    with method.apply(model):
        batch_logits = model(**inputs).logits[:, -1]
        batch_counts = [s.layer_visual_tokens for s in method.stats.samples]
        batch_tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)[:, -3:]
        for row in range(len(samples)):
            single = matrix.cached(("alone", family, modality(family), row), lambda: matrix.alone(fam, model, samples, row))
            torch.testing.assert_close(model(**single).logits[:, -1], batch_logits[row:row + 1], atol=1e-4, rtol=1e-4)
            assert method.stats.samples[0].layer_visual_tokens == batch_counts[row]
            assert model.generate(**single, max_new_tokens=3, do_sample=False)[0, -3:].tolist() == batch_tokens[row].tolist()


def test_cdpruner_reads_the_instruction_embeddings_and_follows_them():
    """The stage gets the LLM input embeddings of the text after the image; another question on the same
    image changes what CDPruner keeps, and not what DivPrune (which ignores the text) keeps."""
    fam, model, samples, inputs = setup("llava")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    other = {**inputs, "input_ids": ids.clone()}
    other["input_ids"][:, -4:] = (ids[:, -4:] * 7 + 3) % 100 + 1  # new question tokens (no padding there)
    kept = {}
    for name in ("cdpruner", "divprune"):
        for key, batch in (("a", inputs), ("b", other)):
            method = reducing(name)
            with method.apply(model):
                model(**batch)
            items = method.stats.visual_items
            kept[name, key] = [o.tolist() for item in items for o in item.origin]
            if name == "cdpruner":
                for item in items:
                    row = batch["input_ids"][item.sample]
                    image_at = (row == fam_image_token(model)).nonzero().max()
                    after = (torch.arange(row.numel()) > image_at) & mask[item.sample].bool()
                    torch.testing.assert_close(item.instruction, model.get_input_embeddings()(row[after]))
    assert kept["cdpruner", "a"] != kept["cdpruner", "b"]
    assert kept["divprune", "a"] == kept["divprune", "b"]


def fam_image_token(model) -> int:
    return model.config.image_token_id


# ----------------------------------------------------------------------------------------------- references
def reference_max_min(x: torch.Tensor, count: int) -> list[int]:
    """DivPrune's greedy max-min diversity, from the paper's definition, in float64 Python loops."""
    rows = [r / math.sqrt(sum(v * v for v in r)) for r in [torch.tensor(row, dtype=torch.float64) for row in x.tolist()]]
    n = len(rows)
    dist = [[1.0 - float(rows[i] @ rows[j]) for j in range(n)] for i in range(n)]
    first = max(range(n), key=lambda j: (min(dist[i][j] for i in range(n) if i != j), -j))
    picked = [first]
    while len(picked) < count:
        rest = [j for j in range(n) if j not in picked]
        picked.append(max(rest, key=lambda j: (min(dist[i][j] for i in picked), -j)))
    return picked


def reference_dpp(kernel: torch.Tensor, count: int) -> list[int]:
    """Greedy MAP by brute force: each step adds the item maximising det(L_S) (float64 determinants)."""
    kernel = kernel.double()
    picked: list[int] = []
    for _ in range(count):
        best, best_det = None, -math.inf
        for j in range(kernel.shape[0]):
            if j in picked:
                continue
            idx = torch.tensor(picked + [j])
            det = float(torch.linalg.det(kernel[idx][:, idx]))
            if det > best_det:
                best, best_det = j, det
        picked.append(best)
    return picked


def reference_remove_duplicates(x: torch.Tensor, count: int, step: int) -> list[int]:
    """VisPruner's duplicate removal from its description: alternate split, drop the A tokens whose best
    cosine match in B is highest, A survivors by descending match then B, until `count` remain."""
    unit = torch.nn.functional.normalize(x.double(), dim=-1)
    remaining = list(range(x.shape[0]))
    while len(remaining) > count:
        a, b = remaining[0::2], remaining[1::2]
        if not b:  # one token left and none wanted
            return []
        drop = min(step, len(remaining) - count, len(a))
        best = {i: max(float(unit[i] @ unit[j]) for j in b) for i in a}
        ranked = sorted(a, key=lambda i: -best[i])  # sorted() is stable: ties keep A's order
        remaining = ranked[drop:] + b
    return remaining


def reference_dart(hidden, keys, visual, question, count, pivot_image, pivot_text) -> set[int]:
    """DART's selection from the paper: key-norm pivots (L2, our documented choice), then per pivot its least
    similar remaining tokens."""
    norms = [math.sqrt(sum(v * v for v in k)) for k in keys.double().tolist()]
    vis = [i for i in range(len(norms)) if visual[i]]
    txt = [i for i in range(len(norms)) if question[i]]
    image_pivots = sorted(vis, key=lambda i: -norms[i])[:min(pivot_image, count)]
    text_pivots = sorted(txt, key=lambda i: -norms[i])[:pivot_text]
    pivots = sorted(image_pivots + text_pivots)
    picks, todo = set(image_pivots), count - len(image_pivots)
    shares = [todo // len(pivots) + (p < todo % len(pivots)) for p in range(len(pivots))]
    unit = torch.nn.functional.normalize(hidden.double(), dim=-1)
    for pivot, share in zip(pivots, shares):
        free = [i for i in vis if i not in picks]
        picks |= set(sorted(free, key=lambda i: float(unit[pivot] @ unit[i]))[:share])
    return picks


@pytest.mark.parametrize("seed", range(3))
def test_divprune_matches_the_reference(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(30, 8, generator=g)
    assert max_min_diverse(x, 9).tolist() == reference_max_min(x, 9)
    item = VisualItem.from_frames(x[None], (5, 6), sample=0)
    out = DiverseSubset(keep=0.3).reduce(item)
    assert out.origin[0].tolist() == sorted(reference_max_min(x, 9))
    assert torch.equal(out.frames[0], x[sorted(reference_max_min(x, 9))])  # a pure selection


@pytest.mark.parametrize("seed", range(3))
def test_cdpruner_dpp_and_relevance_match_the_reference(seed):
    g = torch.Generator().manual_seed(seed)
    x, text = torch.randn(20, 12, generator=g), torch.randn(4, 12, generator=g)
    unit = torch.nn.functional.normalize(x.double(), dim=-1)
    unit_text = torch.nn.functional.normalize(text.double(), dim=-1)
    negative = -(unit @ unit_text.T).mean(dim=1)
    expected = (negative - negative.min() + 1e-6) / (negative.max() - negative.min() + 1e-6)
    relevance = instruction_relevance(x, text)
    torch.testing.assert_close(relevance.double(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(instruction_relevance(x, text, theta=0.5).double(), torch.exp(0.5 * expected), atol=1e-5, rtol=0)
    kernel = expected[:, None] * (unit @ unit.T) * expected[None, :]
    assert dpp_greedy_map(kernel, 8).tolist() == reference_dpp(kernel, 8)
    assert ConditionalDPP(keep=0.4).select(x, text).tolist() == sorted(reference_dpp(kernel, 8))


def test_dpp_past_the_kernel_rank_fills_by_the_diagonal():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]])  # rank 2
    quality = torch.tensor([1.0, 2.0, 3.0, 0.5])
    unit = torch.nn.functional.normalize(x, dim=-1)
    kernel = quality[:, None] * (unit @ unit.T) * quality[None, :]
    picks = dpp_greedy_map(kernel, 4).tolist()
    assert picks[:2] == reference_dpp(kernel, 2)
    rest = sorted(set(range(4)) - set(picks[:2]), key=lambda i: -float(quality[i]))
    assert picks[2:] == rest


@pytest.mark.parametrize("seed", range(3))
def test_vispruner_matches_the_reference(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(37, 6, generator=g)
    for count in (0, 5, 20, 36, 37):
        assert remove_duplicates(x, count, step=4).tolist() == reference_remove_duplicates(x, count, 4)
    attention = torch.rand(36, generator=g)
    frame = torch.randn(36, 6, generator=g)
    kept = ImportantDiverse(keep=0.5, important=0.5, step=8).select(frame, attention)  # 18 = 9 important + 9 diverse
    order = sorted(range(36), key=lambda i: -float(attention[i]))
    rest = order[9:]
    diverse = [rest[i] for i in reference_remove_duplicates(frame[rest], 9, 8)]
    assert kept.tolist() == sorted(order[:9] + diverse)


@pytest.mark.parametrize("seed", range(3))
def test_dart_matches_the_reference(seed):
    g = torch.Generator().manual_seed(seed)
    n = 40
    hidden, keys = torch.randn(n, 16, generator=g), torch.randn(n, 12, generator=g)
    visual = torch.zeros(n, dtype=torch.bool)
    visual[5:29] = True  # 24 visual tokens after 5 text tokens
    question = torch.zeros(n, dtype=torch.bool)
    question[29:] = True
    for count in (1, 6, 13):
        kept = dart_keep(hidden, keys, visual, question, count, pivot_image=4, pivot_text=4)
        assert int(kept.sum()) == count and not bool((kept & ~visual).any())
        assert set(kept.nonzero().squeeze(1).tolist()) == reference_dart(hidden, keys, visual, question, count, 4, 4)
    assert pivot_quotas(10, 4) == [3, 3, 2, 2] and pivot_quotas(2, 8) == [1, 1, 0, 0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="one quota per pivot"):
        dissimilar_to_pivots(hidden, hidden[:2], visual, [1])


# ----------------------------------------------------------------------------------------------- registry, options
def test_registry_and_budgets():
    assert {"divprune", "cdpruner", "vispruner", "dart"} <= set(METHODS)
    for name in ("divprune", "cdpruner", "vispruner"):
        assert budget_options(name, 0.25, 32) == {"keep": 0.25}
    dart = budget_options("dart", 0.5, 32)
    assert dart["layer"] == 1 and dart["keep"] == pytest.approx((0.5 * 32 - 2) / 30)
    assert budget_options("dart", 0.05, 32)["layer"] == 0  # too small for layer 1
    assert leanvlm.DivPrune().keep == 0.098 and leanvlm.DART().layer == 1 and leanvlm.DART().keep == 128 / 576


@pytest.mark.parametrize(("build", "message"), [
    (lambda: leanvlm.DivPrune(keep=0), "keep must be in \\(0, 1\\], got 0"),
    (lambda: leanvlm.CDPruner(theta=0), "theta must be in \\(0, 1\\], got 0"),
    (lambda: leanvlm.CDPruner(negate="no"), "negate must be bool, got 'no'"),
    (lambda: leanvlm.VisPruner(important=1.5), "important must be in \\[0, 1\\], got 1.5"),
    (lambda: leanvlm.VisPruner(step=0), "step must be an int >= 1, got 0"),
    (lambda: leanvlm.DART(pivot_image=0), "pivot_image must be an int >= 1, got 0"),
    (lambda: leanvlm.DART(layer=-1), "layer must be a decoder layer index >= 0, got -1"),
])
def test_bad_options_are_clear_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build()

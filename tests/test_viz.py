"""leanvlm.viz: pure drawing functions, checked on hand-made and real merge groups (no model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from leanvlm import viz
from leanvlm.methods.aim import TokenMerge
from leanvlm.runtime.visual import VisualItem


def picture(size: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.full((size, size, 3), 230, dtype=np.uint8)
    image[size // 4: size // 2, size // 4: 3 * size // 4] = rng.integers(0, 255, size=3)
    return image


def test_patch_roles():
    roles = viz.patch_roles([0, 0, 1, -1, 2, 2, 2, 3])
    assert roles["dropped"].tolist() == [False, False, False, True, False, False, False, False]
    assert roles["kept"].tolist() == [False, False, True, False, False, False, False, True]
    assert roles["merged"].tolist() == [True, True, False, False, True, True, True, False]
    assert roles["size"].tolist() == [2, 2, 1, 0, 3, 3, 3, 1]


def test_group_colours_are_distinct_for_neighbours():
    colours = [viz.group_color(g) for g in range(40)]
    for a, b in zip(colours, colours[1:]):
        assert np.abs(np.subtract(a, b)).max() > 0.2


def test_overlay_counts_and_shape_check():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    groups = np.array([0, 0, 1, -1, 2, 2, 2, 3, 4])
    counts = viz.patch_overlay(ax, picture(), (3, 3), groups, origin=[0, 2, 4, 7, 8])
    assert counts == {"patches": 9, "tokens": 5, "kept": 3, "merged_patches": 5, "groups": 2, "dropped": 1}
    with pytest.raises(ValueError, match="h\\*w"):
        viz.patch_overlay(ax, picture(), (4, 4), groups)
    plt.close(fig)


def merged_item(frames: int, side: int = 8, keep: float = 0.25) -> VisualItem:
    torch.manual_seed(0)
    base = torch.randn(side * side, 16)
    tokens = torch.stack([base + 0.1 * torch.randn_like(base) for _ in range(frames)])
    item = VisualItem.from_frames(tokens, (side, side), sample=0, kind="video" if frames > 1 else "image")
    return TokenMerge(keep).reduce(item)


@pytest.mark.parametrize("frames", [1, 3, 6])
def test_reduction_figure_png_size(tmp_path, frames):
    item = merged_item(frames)
    groups = [g.numpy() for g in item.groups]
    if frames > 1:  # one dropped patch too
        groups[1] = groups[1].copy()
        groups[1][0] = -1
    visual_in, into = 64 * frames, item.num_tokens
    layers = [into + 10] * 3 + [into // 2 + 10] * 3
    visual = [into] * 3 + [into // 2] * 3
    fig = viz.reduction_figure([picture(seed=f) for f in range(frames)], [item.grid] * frames, groups,
                               [o.numpy() for o in item.origin], layers, visual, "AIM(merge_keep=0.25)", visual_in,
                               into, 3.2, base_tokens=visual_in + 10)
    assert fig.texts and "AIM(merge_keep=0.25)" in fig.texts[0].get_text()
    path = viz.save_png(fig, tmp_path / "out" / "fig.png", dpi=80)
    width, height = viz.figure_size(frames)
    with Image.open(path) as png:
        assert png.size == (round(width * 80), round(height * 80))
        pixels = np.asarray(png.convert("RGB"))
    assert pixels.std() > 10  # something was drawn


def test_patch_depth_and_depth_panels(tmp_path):
    groups = np.array([0, 0, 1, -1])
    assert viz.patch_depth(groups, [3, 6]).tolist() == [3, 3, 6, -1]
    item = merged_item(2, side=4, keep=0.5)
    groups = [g.numpy() for g in item.groups]
    depths = [viz.patch_depth(g, np.arange(8) % 5) for g in groups]
    fig = viz.reduction_figure([picture(), picture(1)], [item.grid] * 2, groups, None, [26, 20, 18, 10, 10],
                               [16, 10, 8, 0, 0], "AIM", 32, 16, 1.6, base_tokens=42, depths=depths)
    path = viz.save_png(fig, tmp_path / "depth.png", dpi=50)
    with Image.open(path) as png:
        assert png.size == viz.expected_size(viz.figure_size(2, depth=True), dpi=50)
    with pytest.raises(ValueError, match="h\\*w"):
        import matplotlib.pyplot as plt

        viz.depth_overlay(plt.subplots()[1], picture(), (3, 3), [1, 2], 4)


def test_reduction_figure_needs_matching_lists():
    with pytest.raises(ValueError, match="one entry per frame"):
        viz.reduction_figure([picture()], [(2, 2), (2, 2)], [np.arange(4)], None, [1], [1], "m", 4, 4)


def test_pareto_figure(tmp_path):
    rows = [{"method": "aim", "flops_ratio": r, "accuracy": a} for r, a in ((2, 0.9), (4, 0.85), (7.5, 0.8))]
    rows += [{"method": "fastv", "flops_ratio": r, "accuracy": a} for r, a in ((2.1, 0.88), (4.2, 0.7))]
    fig = viz.pareto_figure(rows, baseline=0.92)
    labels = [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
    assert labels == ["aim", "fastv", "plain model"]
    path = viz.save_png(fig, tmp_path / "pareto.png")
    with Image.open(path) as png:
        assert png.size == viz.expected_size((8, 5.5)) == (800, 550)


@pytest.mark.parametrize("method", ["aim", "fastv", "pyramiddrop"])
def test_visual_depth_matches_layer_counts(method):
    """stats.visual_depth (what the in-LLM panels draw): per layer, the visual tokens with depth > l are
    exactly the visual tokens that layer computed on, for every sample of a left-padded batch."""
    from leanvlm.methods.registry import make_method
    from tiny import batch_inputs, prompt_ids, tiny_llava

    model = tiny_llava(layers=6)
    inputs = batch_inputs([prompt_ids(3, 5, seed=1), prompt_ids(1, 9, seed=2)])
    options = {"aim": {"merge_keep": 0.5, "l1": 1, "l2": 4}, "fastv": {"layer": 1, "keep": 0.25},
               "pyramiddrop": {}}[method]
    chosen = make_method(method, **options)
    with chosen.apply(model):
        model(**inputs)
    assert len(chosen.stats.visual_depth) == 2
    for sample, depth in zip(chosen.stats.samples, chosen.stats.visual_depth):
        depth = np.asarray(depth)
        assert depth.size == sample.visual_into_llm
        assert [int((depth > layer).sum()) for layer in range(6)] == sample.layer_visual_tokens

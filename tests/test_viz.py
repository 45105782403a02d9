"""leanvlm.viz: pure drawing functions, checked on hand-made and real merge groups (no model)."""

from __future__ import annotations

import matplotlib.pyplot as plt
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
    legend = [text.get_text().split(":")[0] for text in fig.legends[0].get_texts()]
    assert legend == ["kept", "merged", "group's representative patch", "dropped"]
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


def test_pareto_front():
    points = [
        (2.0, 0.90),
        (2.0, 0.85),  # same reduction, less accurate: dominated
        (1.5, 0.90),  # as accurate, smaller reduction: dominated
        (4.0, 0.80),
        (4.0, 0.80),  # exact repeat: listed once
        (3.0, 0.70),  # dominated by (4.0, 0.80)
        (8.0, 0.60),
        (6.0, 0.60),  # tie on accuracy, smaller reduction: dominated
        (1.0, 0.95),  # most accurate of all: on the front despite the smallest reduction
    ]
    expected = [(1.0, 0.95), (2.0, 0.90), (4.0, 0.80), (8.0, 0.60)]
    assert viz.pareto_front(points) == expected
    assert viz.pareto_front(reversed(points)) == expected
    assert viz.pareto_front([(3, 0.5)]) == [(3.0, 0.5)]
    assert viz.pareto_front([]) == []


def test_pareto_front_agrees_with_the_sweep_table():
    """The plot circles exactly the rows `leanvlm sweep`'s markdown table marks "Pareto"."""
    from leanvlm.cli.eval import pareto_front as table_front

    rng = np.random.default_rng(0)
    rows = [{"flops_ratio": float(r), "accuracy": float(a)}
            for r, a in zip(rng.choice([1.5, 2.0, 4.0, 7.0], 40), rng.choice([0.6, 0.7, 0.8, 0.9], 40))]
    points = [(row["flops_ratio"], row["accuracy"]) for row in rows]
    assert set(viz.pareto_front(points)) == {(row["flops_ratio"], row["accuracy"]) for row in table_front(rows)}


SWEEP_ROWS = [{"method": "aim", "flops_ratio": r, "accuracy": a} for r, a in ((2, 0.9), (4, 0.85), (7.5, 0.8))]
SWEEP_ROWS += [{"method": "fastv", "flops_ratio": r, "accuracy": a} for r, a in ((2.1, 0.91), (4.2, 0.7))]


def test_pareto_figure(tmp_path):
    fig = viz.pareto_figure(SWEEP_ROWS, baseline=0.92)
    ax = fig.axes[0]
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels == ["aim", "fastv", "Pareto frontier", "plain model"]
    frontier = next(line for line in ax.get_lines() if line.get_label() == "Pareto frontier")
    assert list(zip(frontier.get_xdata(), frontier.get_ydata())) == [(2.1, 0.91), (4, 0.85), (7.5, 0.8)]
    assert frontier.get_drawstyle() == "steps-pre"
    low, high = ax.get_ylim()
    assert low < 0.7 and high > 0.92  # the plain model's line off the frame
    path = viz.save_png(fig, tmp_path / "pareto.png")
    with Image.open(path) as png:
        assert png.size == viz.expected_size((8, 5.5)) == (800, 550)


def test_pareto_figure_is_readable():
    """Powers-of-two tick labels that do not overprint, and a long title (as `leanvlm sweep` writes) wrapped
    inside the figure rather than clipped."""
    rows = SWEEP_ROWS + [{"method": "itp", "flops_ratio": 7.45, "accuracy": 0.82}]
    title = ("Sweep on easyvqa (200 questions, bundled real model (DINOv2-S + SmolLM2-135M, LLaVA), "
             "a few more words so that it is too long for one line)")
    fig = viz.pareto_figure(rows, title=title, baseline=0.92)
    ax = fig.axes[0]
    fig.canvas.draw()
    ticks = [label for label in ax.get_xticklabels() if label.get_text()]
    assert [label.get_text() for label in ticks] == ["1x", "2x", "4x", "8x"]
    boxes = [label.get_window_extent() for label in ticks]
    assert all(left.x1 < right.x0 for left, right in zip(boxes, boxes[1:]))
    figure_box = fig.bbox
    for text in [ax.title, *ticks, ax.get_legend()]:
        box = text.get_window_extent()
        assert figure_box.x0 <= box.x0 and box.x1 <= figure_box.x1 and box.y1 <= figure_box.y1
    assert "\n" in ax.get_title()
    plt.close(fig)


def test_powers_of_two_ticks():
    assert viz.powers_of_two_ticks(1, 7.5) == [1, 2, 4, 8]
    assert viz.powers_of_two_ticks(2, 2) == [2, 4]
    assert viz.powers_of_two_ticks(1, 2 ** 12) == [2.0 ** k for k in range(0, 13, 2)]


@pytest.mark.parametrize("overlay", ["patch_overlay", "depth_overlay"])
@pytest.mark.parametrize(("height", "width", "grid"), [(64, 128, (4, 4)), (64, 128, (3, 8)), (120, 40, (6, 3))])
def test_image_keeps_its_aspect_ratio(overlay, height, width, grid):
    """A W x H image is drawn W wide and H tall, whatever its patch grid."""
    fig, ax = plt.subplots(figsize=(5, 5))
    patches = grid[0] * grid[1]
    if overlay == "patch_overlay":
        viz.patch_overlay(ax, picture()[:1, :1].repeat(height, 0).repeat(width, 1), grid, np.arange(patches))
    else:
        viz.depth_overlay(ax, np.zeros((height, width, 3)), grid, np.arange(patches) % 3, 3)
    fig.canvas.draw()
    drawn = ax.get_window_extent()
    assert drawn.width / drawn.height == pytest.approx(width / height, rel=0.02)
    plt.close(fig)


def test_overlays_let_the_image_show_through():
    """Merged tints and dropped darkening are translucent: the same patches over a black and over a white
    image must still differ by at least 40% of the full range at every patch."""
    groups = np.array([0, 0, -1, 1, 1, -1, 2, 2, 2])  # merged or dropped, no patch left untinted
    renders = []
    for value in (0, 255):
        fig, ax = plt.subplots(figsize=(3, 3), dpi=100)
        viz.patch_overlay(ax, np.full((30, 30, 3), value, dtype=np.uint8), (3, 3), groups)
        fig.canvas.draw()
        pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(float)
        # A point of each patch clear of its borders, its cross and any dot.
        spots = ax.transData.transform([(c + 0.5, r + 0.2) for r in range(3) for c in range(3)])
        rows = pixels.shape[0] - 1 - np.round(spots[:, 1]).astype(int)  # display y grows upwards
        renders.append(pixels[rows, np.round(spots[:, 0]).astype(int)])
        plt.close(fig)
    difference = np.abs(renders[1] - renders[0]).mean(axis=1)
    assert difference.min() > 0.4 * 255, difference


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

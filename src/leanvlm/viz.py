"""Pictures of what a method did, as pure functions (arrays and numbers in, matplotlib figures out).

- `patch_overlay(ax, image, grid, groups)`: one image / video frame with its patch grid coloured by what
  the pre-LLM stages did to each patch: kept as is, merged (one colour per merge group, the group's
  representative patch marked with a dot) or dropped (greyed out and crossed).
- `layer_plot(ax, layer_tokens, layer_visual_tokens, ...)`: tokens each LLM decoder layer computed on,
  against the plain model.
- `reduction_figure(...)`: both, one panel per frame, with a title naming the method and the counts.
- `pareto_figure(rows)`: accuracy against FLOPs reduction for a sweep (`leanvlm sweep`), with the Pareto
  frontier of `pareto_front`.
- `save_png(fig, path, dpi)`: writes a PNG of exactly figsize * dpi pixels.

Nothing here runs a model: `leanvlm show` feeds these from `method.stats` (its `visual_items` and
per-sample layer counts), and the tests feed them hand-made groups.
"""

from __future__ import annotations

import colorsys
import math
import os
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.legend import Legend  # noqa: E402
from matplotlib.legend_handler import HandlerTuple  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

KEPT_EDGE = (1.0, 1.0, 1.0, 0.55)
# Translucent on purpose: the picture must stay readable under every overlay, so a merged patch is only
# tinted and a dropped one only darkened (its cross, not an opaque fill, says "dropped").
DROPPED_FILL = (0.08, 0.08, 0.08, 0.55)
MERGE_ALPHA = 0.3
GOLDEN = 0.618033988749895


def group_color(group: int) -> tuple[float, float, float]:
    """A saturated colour per merge group; consecutive groups (raster neighbours) get far-apart hues."""
    hue = (group * GOLDEN) % 1.0
    value = 0.95 if group % 2 == 0 else 0.8
    return colorsys.hsv_to_rgb(hue, 0.85, value)


def _fit_aspect(ax: Any, grid: tuple[int, int], image_shape: Sequence[int]) -> None:
    """Make the axes draw the image at its own aspect ratio. Data units are patches (x: w columns, y: h
    rows), so one patch is width / w by height / h image pixels and a y unit must be drawn
    (w * height) / (h * width) times as long as an x unit: a W x H image comes out W wide and H tall
    whatever its (h, w) grid. image_shape: (height, width, ...)."""
    h, w = grid
    height, width = image_shape[:2]
    ax.set_aspect((w * height) / (h * width) if height and width else "equal")


def patch_roles(groups: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
    """Classify the patches of one frame. groups [h*w]: output token index per patch, -1 = dropped.

    -> {"dropped", "kept", "merged"} boolean masks [h*w] ("kept": alone in its token; "merged": shares its
    token with other patches) and "size" [h*w]: how many patches the patch's token stands for (0 if dropped).
    """
    groups = np.asarray(groups, dtype=np.int64)
    dropped = groups < 0
    size = np.zeros_like(groups)
    if (~dropped).any():
        counts = np.bincount(groups[~dropped])
        size[~dropped] = counts[groups[~dropped]]
    return {"dropped": dropped, "kept": (size == 1), "merged": (size > 1), "size": size}


def patch_overlay(
    ax: Any,
    image: np.ndarray,
    grid: tuple[int, int],
    groups: Sequence[int] | np.ndarray,
    origin: Sequence[int] | np.ndarray | None = None,
    title: str | None = None,
) -> dict[str, int]:
    """Draw `image` (H, W, 3 uint8 or float in [0, 1]) with its (h, w) patch grid coloured by role.

    groups [h*w]: the output token each patch ended in (-1 dropped), as `VisualItem.groups[f]`.
    origin [T]: the representative patch of each output token (`VisualItem.origin[f]`); merged groups get a
    dot there. Returns the counts {"patches", "tokens", "kept", "merged_patches", "groups", "dropped"}.
    """
    h, w = grid
    groups = np.asarray(groups, dtype=np.int64)
    if groups.shape != (h * w,):
        raise ValueError(f"groups must have h*w = {h * w} entries for grid {grid}, got shape {groups.shape}")
    roles = patch_roles(groups)
    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    ax.imshow(img, extent=(0, w, h, 0), interpolation="bilinear")

    overlay = np.zeros((h * w, 4))
    merged_ids = np.unique(groups[roles["merged"]])
    for g in merged_ids:
        overlay[groups == g] = (*group_color(int(g)), MERGE_ALPHA)
    overlay[roles["dropped"]] = DROPPED_FILL
    ax.imshow(overlay.reshape(h, w, 4), extent=(0, w, h, 0), interpolation="nearest")

    # Patch borders: thin between patches of one token, thick where the token (or role) changes.
    board = groups.reshape(h, w)
    thin, thick = [], []
    for r in range(h):
        for c in range(w - 1):
            same = board[r, c] == board[r, c + 1] and board[r, c] >= 0
            (thin if same else thick).append([(c + 1, r), (c + 1, r + 1)])
    for r in range(h - 1):
        for c in range(w):
            same = board[r, c] == board[r + 1, c] and board[r, c] >= 0
            (thin if same else thick).append([(c, r + 1), (c + 1, r + 1)])
    ax.add_collection(LineCollection(thin, colors=[KEPT_EDGE], linewidths=0.4))
    # Token borders white over a dark halo, so they show on light and dark pictures alike.
    ax.add_collection(LineCollection(thick, colors=[(0, 0, 0, 0.6)], linewidths=2.2))
    ax.add_collection(LineCollection(thick, colors="white", linewidths=1.0))
    # Dropped patches: a cross.
    crosses = []
    for index in np.flatnonzero(roles["dropped"]):
        r, c = divmod(int(index), w)
        crosses += [[(c + 0.25, r + 0.25), (c + 0.75, r + 0.75)], [(c + 0.25, r + 0.75), (c + 0.75, r + 0.25)]]
    if crosses:
        ax.add_collection(LineCollection(crosses, colors=[(1, 1, 1, 0.75)], linewidths=0.8))
    if origin is not None:
        origin = np.asarray(origin, dtype=np.int64)
        size_of_token = np.bincount(groups[groups >= 0], minlength=len(origin)) if (groups >= 0).any() else np.zeros(len(origin))
        dots = [divmod(int(patch), w) for token, patch in enumerate(origin.tolist()) if size_of_token[token] > 1]
        if dots:
            ys, xs = zip(*dots)
            ax.scatter(np.array(xs) + 0.5, np.array(ys) + 0.5, s=max(2.0, 90.0 / max(h, w)), c="white",
                       edgecolors="black", linewidths=0.5, zorder=3)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    _fit_aspect(ax, grid, img.shape)
    counts = {
        "patches": h * w,
        "tokens": int(len(np.unique(groups[groups >= 0]))),
        "kept": int(roles["kept"].sum()),
        "merged_patches": int(roles["merged"].sum()),
        "groups": int(len(merged_ids)),
        "dropped": int(roles["dropped"].sum()),
    }
    if title is not None:
        ax.set_title(title, fontsize=9)
    return counts


def overlay_legend(fig: Figure, y: float) -> Legend:
    """The key to `patch_overlay`'s marks, one row centred at the bottom of `fig` (y: figure fraction).
    Each swatch is drawn the way the panels draw the role: untinted, tinted (three group colours), dot,
    darkened and crossed."""
    merged = tuple(Patch(facecolor=(*group_color(g), MERGE_ALPHA), edgecolor="0.3", linewidth=0.6)
                   for g in range(3))
    dropped = (Line2D([], [], marker="s", markersize=13, linestyle="none", markerfacecolor=DROPPED_FILL,
                      markeredgecolor="0.3", markeredgewidth=0.6),
               Line2D([], [], marker="x", markersize=7, linestyle="none", markeredgecolor="white"))
    entries = [
        (Patch(facecolor="none", edgecolor="0.3", linewidth=0.6), "kept: own token, untinted"),
        (merged, "merged: tint = merge group"),
        (Line2D([], [], marker="o", linestyle="none", markerfacecolor="white", markeredgecolor="black"),
         "group's representative patch"),
        (dropped, "dropped: darkened, crossed"),
    ]
    handles, labels = zip(*entries)
    return fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8.5, frameon=False,
                      bbox_to_anchor=(0.5, y), handlelength=3.0,
                      handler_map={merged: HandlerTuple(ndivide=None, pad=0), dropped: HandlerTuple(ndivide=1)})


def layer_plot(
    ax: Any,
    layer_tokens: Sequence[int],
    layer_visual_tokens: Sequence[int],
    base_tokens: int | None = None,
    base_visual: int | None = None,
    title: str | None = "Tokens per LLM decoder layer",
) -> None:
    """Step plot of the tokens (all, and visual) each decoder layer computed on; the plain model dashed."""
    layers = np.arange(len(layer_tokens))
    ax.step(layers, layer_tokens, where="mid", color="#1f77b4", linewidth=2, label="all tokens (method)")
    ax.step(layers, layer_visual_tokens, where="mid", color="#d62728", linewidth=2, label="visual tokens (method)")
    if base_tokens is not None:
        ax.axhline(base_tokens, color="#1f77b4", linestyle="--", linewidth=1, label="all tokens (plain model)")
    if base_visual is not None:
        ax.axhline(base_visual, color="#d62728", linestyle="--", linewidth=1, label="visual tokens (plain model)")
    ax.fill_between(layers, 0, layer_visual_tokens, step="mid", color="#d62728", alpha=0.12)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("tokens")
    ax.set_xlim(-0.5, len(layer_tokens) - 0.5)
    ax.set_ylim(0, max([*layer_tokens, base_tokens or 0]) * 1.12 + 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    if title:
        ax.set_title(title, fontsize=10)


def patch_depth(groups: Sequence[int] | np.ndarray, token_depth: Sequence[int] | np.ndarray) -> np.ndarray:
    """Per patch, how many LLM decoder layers computed on the token the patch ended in (-1: the patch was
    dropped before the LLM). groups [h*w] as in `patch_overlay`; token_depth [T]: per output token of the
    frame (`ReductionStats.visual_depth`, sliced to the frame)."""
    groups = np.asarray(groups, dtype=np.int64)
    token_depth = np.asarray(token_depth, dtype=np.int64)
    out = np.full(groups.shape, -1, dtype=np.int64)
    valid = groups >= 0
    out[valid] = token_depth[groups[valid]]
    return out


DEPTH_CMAP = "viridis"


def depth_overlay(ax: Any, image: np.ndarray, grid: tuple[int, int], depth: Sequence[int] | np.ndarray,
                  num_layers: int, title: str | None = None) -> Any:
    """Draw the patches coloured by how many decoder layers computed on them (dark: dropped early, bright:
    kept through all `num_layers`); patches dropped before the LLM are greyed out and crossed.
    -> the colour mapping (for a colorbar)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    h, w = grid
    depth = np.asarray(depth, dtype=np.int64)
    if depth.shape != (h * w,):
        raise ValueError(f"depth must have h*w = {h * w} entries for grid {grid}, got shape {depth.shape}")
    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    grey = img.mean(axis=2, keepdims=True).repeat(3, axis=2).astype(np.uint8) if img.ndim == 3 else img
    ax.imshow(grey, extent=(0, w, h, 0), interpolation="bilinear")
    mapping = ScalarMappable(Normalize(0, num_layers), DEPTH_CMAP)
    colours = mapping.to_rgba(np.clip(depth, 0, num_layers))
    colours[:, 3] = 0.72
    colours[depth < 0] = DROPPED_FILL
    ax.imshow(colours.reshape(h, w, 4), extent=(0, w, h, 0), interpolation="nearest")
    crosses = []
    for index in np.flatnonzero(depth < 0):
        r, c = divmod(int(index), w)
        crosses += [[(c + 0.25, r + 0.25), (c + 0.75, r + 0.75)], [(c + 0.25, r + 0.75), (c + 0.75, r + 0.25)]]
    if crosses:
        ax.add_collection(LineCollection(crosses, colors=[(1, 1, 1, 0.75)], linewidths=0.8))
    lines = [[(c, 0), (c, h)] for c in range(1, w)] + [[(0, r), (w, r)] for r in range(1, h)]
    ax.add_collection(LineCollection(lines, colors=[KEPT_EDGE], linewidths=0.4))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    _fit_aspect(ax, grid, img.shape)
    if title is not None:
        ax.set_title(title, fontsize=9)
    return mapping


PANELS_PER_ROW = 4


def _layout(frames: int, depth: bool) -> tuple[int, int, float, float, float]:
    """(rows, columns, panel inches, width, height) of `reduction_figure`'s grid layout."""
    panels = frames * (2 if depth else 1)
    columns = min(panels, PANELS_PER_ROW)
    rows = math.ceil(panels / columns)
    bar = 0.9 if depth else 0.0
    width = 11.0 if columns <= 3 else columns * 2.9 + 0.6 + bar
    panel = min(4.4, (width - 0.6 - bar) / columns - 0.15)
    height = 1.1 + rows * (panel + 0.4) + 3.4 + 0.6
    return rows, columns, panel, width, height


def figure_size(frames: int, depth: bool = False) -> tuple[float, float]:
    """(width, height) in inches of `reduction_figure` for this many frames (with the in-LLM depth panels
    or not)."""
    if frames <= 1 and not depth:
        return 11.0, 6.2
    _, _, _, width, height = _layout(frames, depth)
    return width, height


def reduction_figure(
    images: Sequence[np.ndarray],
    grids: Sequence[tuple[int, int]],
    groups: Sequence[Sequence[int] | np.ndarray],
    origins: Sequence[Sequence[int] | np.ndarray | None] | None,
    layer_tokens: Sequence[int],
    layer_visual_tokens: Sequence[int],
    method: str,
    visual_in: int,
    visual_into_llm: int,
    flops_ratio: float | None = None,
    base_tokens: int | None = None,
    depths: Sequence[Sequence[int] | np.ndarray] | None = None,
) -> Figure:
    """Panels per image / video frame (`images[i]` with `grids[i]`, `groups[i]`, `origins[i]`) and the
    tokens-per-layer plot, titled with the method and its counts.

    depths[i] (optional, `patch_depth` of frame i): adds an "inside the LLM" panel per frame coloured by
    how many decoder layers computed on each patch's token. One frame without depths: image left, plot
    right; otherwise up to 4 panels per row and the plot below. Size: `figure_size(len(images), depths
    is not None)` inches. base_tokens: tokens every layer of the plain model computes on (dashed line).
    """
    n = len(images)
    if n == 0 or not (len(grids) == len(groups) == n) or (origins is not None and len(origins) != n) \
            or (depths is not None and len(depths) != n):
        raise ValueError("images, grids, groups (and origins, depths) need one entry per frame, at least one")
    with_depth = depths is not None
    width, height = figure_size(n, with_depth)
    fig = plt.figure(figsize=(width, height))

    def axes(left: float, bottom: float, w: float, h: float) -> Any:  # inches -> figure fractions
        return fig.add_axes((left / width, bottom / height, w / width, h / height))

    legend_y = 0.12  # inches from the bottom
    depth_axes: list[Any] = []
    if n == 1 and not with_depth:
        frame_axes = [axes(0.3, 0.75, 4.5, 4.5)]
        ax_layers = axes(5.75, 1.25, width - 6.1, 3.95)
    else:
        rows, columns, panel, _, _ = _layout(n, with_depth)
        step = (width - 0.6 - (0.9 if with_depth else 0.0)) / columns
        top = height - 1.1
        frame_axes = []
        for k in range(n * (2 if with_depth else 1)):
            r, c = divmod(k, columns)
            ax = axes(0.3 + c * step + (step - panel) / 2, top - (r + 1) * (panel + 0.4) + 0.1, panel, panel)
            (depth_axes if with_depth and k % 2 else frame_axes).append(ax)
        ax_layers = axes(0.85, 1.15, width - 1.2, 2.6)

    totals = {"kept": 0, "merged_patches": 0, "groups": 0, "dropped": 0}
    for i, ax in enumerate(frame_axes):
        counts = patch_overlay(ax, images[i], grids[i], groups[i], None if origins is None else origins[i])
        label = f"frame {i}: " if n > 1 else ""
        ax.set_title(f"{label}{counts['patches']} patches -> {counts['tokens']} tokens", fontsize=9)
        for key in totals:
            totals[key] += counts[key]
    mapping = None
    for i, ax in enumerate(depth_axes):
        label = f"frame {i}: " if n > 1 else ""
        mapping = depth_overlay(ax, images[i], grids[i], depths[i], len(layer_tokens),
                                f"{label}inside the LLM: layers per token")
    if mapping is not None:
        bar = fig.add_axes(((width - 0.75) / width, 4.3 / height, 0.18 / width, (height - 5.6) / height))
        fig.colorbar(mapping, cax=bar, label="decoder layers that computed on the token")
    base_visual = visual_in if base_tokens is not None else None
    layer_plot(ax_layers, layer_tokens, layer_visual_tokens, base_tokens, base_visual)
    ratio = f";  prefill FLOPs / {flops_ratio:.2f} (analytic)" if flops_ratio else ""
    fig.suptitle(
        f"{method}\n{visual_in} visual tokens -> {visual_into_llm} into the LLM{ratio}\n"
        f"patches: {totals['kept']} kept alone, {totals['merged_patches']} merged into {totals['groups']} groups, "
        f"{totals['dropped']} dropped before the LLM",
        fontsize=10.5, y=1 - 0.08 / height, va="top",
    )
    overlay_legend(fig, legend_y / height)
    return fig


def pareto_front(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (flops_ratio, accuracy) points no other point dominates, i.e. the best accuracy reached at each
    FLOPs reduction or more. A point is dominated by another at least as large in both coordinates and
    larger in one (the rule of the sweep table's "Pareto" column, `cli.eval.pareto_front`).

    points: (flops_ratio, accuracy) pairs, any order, repeats allowed. -> the front, each point once, by
    flops_ratio ascending (so accuracy strictly descending).
    """
    front: list[tuple[float, float]] = []
    best_accuracy = -math.inf
    # From the largest reduction down (most accurate first among equal reductions), a point is on the front
    # exactly when it beats every accuracy seen so far.
    for ratio, accuracy in sorted({(float(r), float(a)) for r, a in points}, reverse=True):
        if accuracy > best_accuracy:
            front.append((ratio, accuracy))
            best_accuracy = accuracy
    return front[::-1]


def powers_of_two_ticks(low: float, high: float, most: int = 8) -> list[float]:
    """Tick positions 2^k covering [low, high] (both > 0), every other power (or sparser) when more than
    `most` would be needed, so that labels like "1x 2x 4x 8x" never overprint."""
    first, last = math.floor(math.log2(low)), math.ceil(math.log2(high))
    if first == last:
        last += 1  # one power alone would leave the axis with a single label
    stride = math.ceil((last - first + 1) / most)
    return [2.0 ** k for k in range(first, last + 1, stride)]


def pareto_figure(rows: Sequence[Mapping[str, Any]], title: str = "Accuracy vs prefill FLOPs reduction",
                  baseline: float | None = None) -> Figure:
    """Accuracy against FLOPs ratio (full / method, log x with ticks at powers of two), one line per method,
    and the Pareto frontier of all methods' points (`pareto_front`) as a wide grey staircase: the best
    accuracy any run reached at that reduction or more.

    rows: dicts with "method", "flops_ratio", "accuracy" (as `leanvlm sweep` writes them). baseline: the
    plain model's accuracy, drawn as a dashed line (and 1x kept in view). Long titles wrap; the legend sits
    right of the plot. Figure 8 x 5.5 inches.
    """
    fig, ax = plt.subplots(figsize=(8, 5.5), layout="constrained")
    by_method: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        by_method.setdefault(str(row["method"]), []).append((float(row["flops_ratio"]), float(row["accuracy"])))
    markers = "osD^v<>pPX*h"
    for k, (method, points) in enumerate(sorted(by_method.items())):
        points.sort()
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker=markers[k % len(markers)], linewidth=1.6, label=method, zorder=3)
    all_points = [point for points in by_method.values() for point in points]
    front = pareto_front(all_points)
    if front:
        xs, ys = zip(*front)
        # "pre" steps: between two front points the best accuracy is the one of the larger reduction.
        ax.step(xs, ys, where="pre", color=(0, 0, 0, 0.22), linewidth=7, solid_capstyle="round",
                solid_joinstyle="round", marker="o", markersize=12, markerfacecolor="none",
                markeredgecolor="black", markeredgewidth=1.2, zorder=2, label="Pareto frontier")
    if baseline is not None:
        ax.axhline(baseline, color="black", linestyle="--", linewidth=1, label="plain model", zorder=1)
    ax.set_xscale("log", base=2)
    ratios = [x for x, _ in all_points] + ([1.0] if baseline is not None else [])
    accuracies = [y for _, y in all_points] + ([baseline] if baseline is not None else [])
    if accuracies:  # explicit, as autoscaling ignores axhline and would leave the plain model on the frame
        pad = 0.06 * (max(accuracies) - min(accuracies)) or 0.02
        ax.set_ylim(min(accuracies) - pad, max(accuracies) + pad)
    if ratios:
        ticks = powers_of_two_ticks(min(ratios), max(ratios))
        ax.set_xticks(ticks, labels=[f"{tick:g}x" for tick in ticks])
        ax.minorticks_off()
        margin = 2 ** 0.12  # keeps points on the outermost ticks off the frame
        ax.set_xlim(ticks[0] / margin, max(ticks[-1], max(ratios)) * margin)
    ax.set_xlabel("prefill FLOPs reduction (full / method, analytic)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.set_title(textwrap.fill(title, width=60, break_on_hyphens=False), fontsize=11)
    return fig


def save_png(fig: Figure, path: str | os.PathLike[str], dpi: int = 100) -> str:
    """Write `fig` as a PNG of exactly figsize * dpi pixels (no tight bbox) and close it. -> the path."""
    path = os.fspath(path)
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    plt.close(fig)
    return path


def expected_size(fig_or_size: Figure | tuple[float, float], dpi: int = 100) -> tuple[int, int]:
    """(width, height) in pixels that `save_png` writes for this figure (or figsize) at `dpi`."""
    size = fig_or_size.get_size_inches() if isinstance(fig_or_size, Figure) else fig_or_size
    return round(size[0] * dpi), round(size[1] * dpi)

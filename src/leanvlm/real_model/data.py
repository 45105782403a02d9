"""Datasets of the bundled real model: easy-VQA (shipped by `easy-vqa==1.0`, MIT) and generated scenes.

easy-VQA: 64x64 images with one shape (circle / rectangle / triangle) in one of 8 colours on a pale
background; 38,575 train / 9,673 test questions about 4,000 / 1,000 images. Question types (from the
answer): "shape" (what is the blue shape?), "color" (what color is the shape?), "yes/no" (is there a
red shape? / is there not a circle?).

Scenes (ours): 128x128 images with 2-4 shapes of distinct (colour, shape) pairs, asking for counting,
colour of a named shape, shape of a named colour, and relative position (left of / above) as yes/no.
Deterministic given (split, seed): train and test come from different random streams.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from leanvlm.real_model.locate import package_dir

SHAPES = ("circle", "rectangle", "triangle")
# easy-VQA's colour names with the RGB values its images use.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
    "yellow": (255, 255, 0),
}
COUNTS = ("2", "3", "4")
QUESTION_TYPES = ("shape", "color", "yes/no", "count", "position")


@dataclass(frozen=True)
class VQAItem:
    """One question about one image. `image_key` identifies the image (items of one image share it)."""

    image: Image.Image
    question: str
    answer: str
    qtype: str
    image_key: str


def question_type(answer: str) -> str:
    """easy-VQA question type from its answer: "shape", "color" or "yes/no"."""
    if answer in SHAPES:
        return "shape"
    if answer in COLORS:
        return "color"
    if answer in ("yes", "no"):
        return "yes/no"
    raise ValueError(f"not an easy-VQA answer: {answer!r}")


def load_vqa_dir(directory: str, prefix: str = "") -> list[VQAItem]:
    """Items of a directory in easy-VQA's layout: `images/N.png` and `questions.json` rows `[q, a, N]`.

    Images are decoded once and shared by all questions about them; order follows questions.json.
    """
    with open(os.path.join(directory, "questions.json")) as f:
        rows = json.load(f)
    images: dict[int, Image.Image] = {}
    items = []
    for question, answer, image_id in rows:
        if image_id not in images:
            with Image.open(os.path.join(directory, "images", f"{image_id}.png")) as im:
                images[image_id] = im.convert("RGB")
        items.append(VQAItem(images[image_id], question, answer, question_type(answer), f"{prefix}{image_id}"))
    return items


def easyvqa(split: str) -> list[VQAItem]:
    """easy-VQA "train" (38,575 items) or "test" (9,673 items) from the installed easy-vqa wheel."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return load_vqa_dir(os.path.join(package_dir("easy_vqa"), "data", split), prefix=f"easyvqa-{split}-")


# ----------------------------------------------------------------------------------------------------
# Generated scenes
_SPLIT_STREAM = {"train": 0, "test": 1}
_SIZE = 128
_SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased edges like easy-VQA's


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    s = _SUPERSAMPLE
    if shape == "circle":
        draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=fill)
    elif shape == "rectangle":
        draw.rectangle([(cx - r) * s, (cy - 0.7 * r) * s, (cx + r) * s, (cy + 0.7 * r) * s], fill=fill)
    else:
        draw.polygon([(cx * s, (cy - r) * s), ((cx - r) * s, (cy + 0.8 * r) * s), ((cx + r) * s, (cy + 0.8 * r) * s)],
                     fill=fill)


def _scene(rng: np.random.Generator) -> tuple[Image.Image, list[tuple[str, str, float, float]]]:
    """Draw 2-4 non-overlapping shapes of distinct colours on a pale background; returns (image, objects).

    Objects are (color, shape, cx, cy) in 128-px image coordinates. Colours are distinct within a scene,
    so "the red shape" names one object; shapes may repeat.
    """
    n = int(rng.integers(2, 5))
    colors = rng.choice(list(COLORS), size=n, replace=False)
    background = tuple(int(v) for v in rng.integers(225, 256, size=3))
    image = Image.new("RGB", (_SIZE * _SUPERSAMPLE,) * 2, background)
    draw = ImageDraw.Draw(image)
    placed: list[tuple[str, str, float, float, float]] = []
    while len(placed) < n:
        r = float(rng.uniform(11, 18))
        cx, cy = (float(v) for v in rng.uniform(r + 2, _SIZE - r - 2, size=2))
        if all((cx - px) ** 2 + (cy - py) ** 2 > (r + pr + 4) ** 2 for _, _, px, py, pr in placed):
            placed.append((str(colors[len(placed)]), str(rng.choice(SHAPES)), cx, cy, r))
    for color, shape, cx, cy, r in placed:
        _draw_shape(draw, shape, cx, cy, r, COLORS[color])
    image = image.resize((_SIZE, _SIZE), Image.Resampling.LANCZOS)
    return image, [(c, s, x, y) for c, s, x, y, _ in placed]


def _scene_questions(rng: np.random.Generator, objects) -> list[tuple[str, str, str]]:
    """(question, answer, qtype) rows for one scene: one count, one colour, one shape, up to two position."""
    rows = [("how many shapes are there?", str(len(objects)), "count")]
    shape_counts = {s: sum(o[1] == s for o in objects) for s in SHAPES}
    unique = [o for o in objects if shape_counts[o[1]] == 1]
    if unique:
        color, shape, _, _ = unique[int(rng.integers(len(unique)))]
        rows.append((f"what color is the {shape}?", color, "color"))
    color, shape, _, _ = objects[int(rng.integers(len(objects)))]
    rows.append((f"what shape is {color}?", shape, "shape"))
    # Relative position between two objects named by colour, asked only when the offset is clear
    # (> 12 px of 128) so the answer is unambiguous; the yes/no balance comes from the random order.
    for axis, relation in ((0, "to the left of"), (1, "above")):
        i, j = rng.choice(len(objects), size=2, replace=False)
        a, b = objects[int(i)], objects[int(j)]
        delta = a[2 + axis] - b[2 + axis]
        if abs(delta) > 12:
            rows.append((f"is the {a[0]} shape {relation} the {b[0]} shape?", "yes" if delta < 0 else "no", "position"))
    return rows


def scenes(split: str, n: int, seed: int = 0) -> list[VQAItem]:
    """Questions about `n` generated scenes (3-5 questions each), deterministic in (split, seed).

    Train and test use different random streams of the same seed, so they share no scene.
    """
    if split not in _SPLIT_STREAM:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split]])
    items = []
    for k in range(n):
        image, objects = _scene(rng)
        for question, answer, qtype in _scene_questions(rng, objects):
            items.append(VQAItem(image, question, answer, qtype, f"scenes-{split}-{seed}-{k}"))
    return items

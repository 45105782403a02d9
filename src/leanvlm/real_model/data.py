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

    @property
    def media(self) -> tuple[str, Image.Image]:
        """("image", image), as `leanvlm.hub.build_inputs` takes it."""
        return "image", self.image


def question_type(answer: str) -> str:
    """Question type from the answer: "shape", "color", "yes/no" (easy-VQA's), "count" (the scenes'
    2 / 3 / 4), else "other" (a free-form answer, scored by `--mode generate`)."""
    if answer in SHAPES:
        return "shape"
    if answer in COLORS:
        return "color"
    if answer in ("yes", "no"):
        return "yes/no"
    if answer in COUNTS:
        return "count"
    return "other"


def read_question_rows(path: str, media: str = "image") -> list[tuple[int, str, str, int]]:
    """The rows of a `questions.json`: a JSON list of `[question, answer, N]` (N: the `media` file's number)
    -> [(row number, question, answer, N)]. ValueError naming the file and the row for malformed JSON, a bad
    row or an empty question."""
    try:
        with open(path) as f:
            rows = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of [question, answer, {media} number] rows, got {type(rows).__name__}")
    out = []
    for number, row in enumerate(rows):
        if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str) and isinstance(row[1], str)
                and isinstance(row[2], int) and not isinstance(row[2], bool)):
            raise ValueError(f"{path}: row {number} must be [question, answer, {media} number], got {row!r}")
        if not row[0].strip():
            raise ValueError(f"{path}: row {number} has an empty question")
        out.append((number, *row))
    return out


def load_vqa_dir(directory: str, prefix: str = "") -> list[VQAItem]:
    """Items of a directory in easy-VQA's layout: `images/N.png` and `questions.json`, a JSON list of
    `[question, answer, N]` rows (N: the image file's number; any answer string).

    Images are decoded once and shared by all questions about them; order follows questions.json.
    ValueError naming the file and the row for malformed JSON, a bad row or a missing / unreadable image.
    """
    path = os.path.join(directory, "questions.json")
    images: dict[int, Image.Image] = {}
    items = []
    for number, question, answer, image_id in read_question_rows(path):
        if image_id not in images:
            image_path = os.path.join(directory, "images", f"{image_id}.png")
            try:
                with Image.open(image_path) as im:
                    images[image_id] = im.convert("RGB")
            except (OSError, SyntaxError) as error:
                raise ValueError(f"{path}: row {number} needs {image_path}, which cannot be read ({error})") from error
        items.append(VQAItem(images[image_id], question, answer, question_type(answer), f"{prefix}{image_id}"))
    return items


def easyvqa(split: str) -> list[VQAItem]:
    """easy-VQA "train" (38,575 items) or "test" (9,673 items) from the installed easy-vqa wheel."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return load_vqa_dir(os.path.join(package_dir("easy_vqa"), "data", split), prefix=f"easyvqa-{split}-")


# ----------------------------------------------------------------------------------------------------
# Generated scenes
_SPLIT_STREAM = {"train": 0, "test": 1, "heldout": 2}
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


def _every_scene_question(objects) -> list[tuple[str, str, str]]:
    """Every question of the scene kinds one scene can answer (training only): the colour of each shape
    that occurs once, the shape of each colour, and both relations for every ordered pair of objects
    whose offset is clear. Deterministic in `objects`; consumes no random numbers."""
    shape_counts = {s: sum(o[1] == s for o in objects) for s in SHAPES}
    rows = [(f"what color is the {shape}?", color, "color") for color, shape, _, _ in objects if shape_counts[shape] == 1]
    rows += [(f"what shape is {color}?", shape, "shape") for color, shape, _, _ in objects]
    for axis, relation in ((0, "to the left of"), (1, "above")):
        for a in objects:
            for b in objects:
                delta = a[2 + axis] - b[2 + axis]
                if a is not b and abs(delta) > 12:
                    rows.append((f"is the {a[0]} shape {relation} the {b[0]} shape?", "yes" if delta < 0 else "no",
                                 "position"))
    return rows


def scenes(split: str, n: int, seed: int = 0, every_question: bool = False) -> list[VQAItem]:
    """Questions about `n` generated scenes (3-5 questions each), deterministic in (split, seed).

    Train and test use different random streams of the same seed, so they share no scene.
    `every_question=True` (for training) adds every other question the scene answers (up to ~30 a
    scene: all colour / shape / ordered-pair position questions) to the same images; the questions of
    the default draw come first and the images are identical.
    """
    items = []
    for k, (image, objects, rows) in enumerate(_scene_stream(split, n, seed)):
        if every_question:
            rows += [row for row in _every_scene_question(objects) if row not in rows]
        for question, answer, qtype in rows:
            items.append(VQAItem(image, question, answer, qtype, f"scenes-{split}-{seed}-{k}"))
    return items


def scene_objects(split: str, n: int, seed: int = 0) -> list[tuple[Image.Image, list[tuple[str, str, float, float]]]]:
    """The images of `scenes(split, n, seed)` with their objects (color, shape, cx, cy), cx / cy in the
    128-px image's coordinates (for analyses that need where each shape is)."""
    return [(image, objects) for image, objects, _ in _scene_stream(split, n, seed)]


def _scene_stream(split: str, n: int, seed: int):
    """(image, objects, question rows) of each of `n` scenes: one random stream per (split, seed)."""
    if split not in _SPLIT_STREAM:
        raise ValueError(f"split must be one of {', '.join(map(repr, _SPLIT_STREAM))}, got {split!r}")
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split]])
    for _ in range(n):
        image, objects = _scene(rng)
        yield image, objects, _scene_questions(rng, objects)


# ----------------------------------------------------------------------------------------------------
# Fresh easy-VQA-style images (held out: never part of easy-VQA, our training or our test splits)
_EASY_SIZE = 64


def _easyvqa_questions(rng: np.random.Generator, color: str, shape: str) -> list[tuple[str, str, str]]:
    """One shape, one colour and two yes/no questions in easy-VQA's phrasings."""
    rows = [
        (str(rng.choice(["what shape is in the image?", "what shape is present?", f"what is the {color} shape?"])),
         shape, "shape"),
        (str(rng.choice(["what color is the shape?", "what is the color of the shape?", f"what color is the {shape}?"])),
         color, "color"),
    ]
    for _ in range(2):
        asks_shape = bool(rng.integers(2))
        thing = str(rng.choice(SHAPES)) if asks_shape else str(rng.choice(list(COLORS)))
        present = thing == (shape if asks_shape else color)
        noun = f"a {thing}" if asks_shape else f"a {thing} shape"
        negated = bool(rng.integers(2))
        question = f"is there not {noun}?" if negated else str(rng.choice([f"is there {noun}?", f"does the image contain {noun}?"]))
        rows.append((question, "yes" if present != negated else "no", "yes/no"))
    return rows


def fresh_easyvqa(n: int, seed: int = 0) -> list[VQAItem]:
    """Questions (4 each) about `n` newly drawn 64x64 easy-VQA-style images: one shape of one of the 8
    colours, of random size and place, on a random pale background. Deterministic in `seed`; its random
    stream is separate from the scenes' train / test streams, and easy-VQA's own images are not used."""
    rng = np.random.default_rng([seed, _SPLIT_STREAM["heldout"], 64])
    items = []
    for k in range(n):
        color, shape = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
        background = tuple(int(v) for v in rng.integers(228, 256, size=3))
        image = Image.new("RGB", (_EASY_SIZE * _SUPERSAMPLE,) * 2, background)
        r = float(rng.uniform(5, 16))
        cx, cy = (float(v) for v in rng.uniform(r, _EASY_SIZE - r, size=2))
        _draw_shape(ImageDraw.Draw(image), shape, cx, cy, r, COLORS[color])
        image = image.resize((_EASY_SIZE, _EASY_SIZE), Image.Resampling.LANCZOS)
        for question, answer, qtype in _easyvqa_questions(rng, color, shape):
            items.append(VQAItem(image, question, answer, qtype, f"fresh-easyvqa-{seed}-{k}"))
    return items

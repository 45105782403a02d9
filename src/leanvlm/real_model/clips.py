"""Generated clips: short videos of shapes, with questions that need time and space to answer.

A clip is `FRAMES` (8) frames of 112x112 px on one pale background. It holds 2 or 3 objects of distinct
shapes (circle / rectangle / triangle, so "the circle" names one object) and distinct colours. Each object
is visible during one interval of frames; the objects start appearing at distinct frames (the first at
frame 0), so "first" and "last" are unambiguous. One object, the mover, slides horizontally (left or
right, >= 40 px) along the middle band while it is visible and may change colour once; the others stand
still in the top and bottom bands, so objects never overlap.

Questions (qtype: question -> answer):
    order      "which shape appears first?" / "which shape appears last?" (the last one to appear) -> shape
    count      "how many frames show a <colour> shape?" (a still object's colour)                  -> "2".."8"
    color      "what color is the moving shape at the start?" / "... at the end?"                 -> colour
    direction  "does the <shape> move left or right?" (the mover)                                 -> "left" / "right"
    presence   "is there a <shape> in any frame?"                                                -> "yes" / "no"
Deterministic given (split, seed); train, test and heldout come from different random streams.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from leanvlm.real_model.data import _SUPERSAMPLE, COLORS, SHAPES, _draw_shape, question_type, read_question_rows

FRAMES = 8
FRAME_SIZE = 112
CLIP_COUNTS = tuple(str(n) for n in range(2, FRAMES + 1))
DIRECTIONS = ("left", "right")
# Closed answer set of the clips (first tokens distinct: checked by `video_model.clip_answer_token_ids`).
CLIP_ANSWERS: tuple[str, ...] = SHAPES + tuple(COLORS) + ("yes", "no") + DIRECTIONS + CLIP_COUNTS
CLIP_QUESTION_TYPES = ("order", "count", "color", "direction", "presence")
_SPLIT_STREAM = {"train": 10, "test": 11, "heldout": 12}
_BANDS = (24.0, 56.0, 88.0)  # y centres: top (still), middle (mover), bottom (still)


@dataclass(frozen=True)
class ClipItem:
    """One question about one clip. `frames`: FRAMES PIL images; items of one clip share `clip_key`."""

    frames: tuple[Image.Image, ...]
    question: str
    answer: str
    qtype: str
    clip_key: str

    @property
    def media(self) -> tuple[str, list[Image.Image]]:
        """("video", frames), as `leanvlm.hub.build_inputs` takes it."""
        return "video", list(self.frames)

    @property
    def image_key(self) -> str:
        """What identifies the clip (the evaluation harness groups questions by it)."""
        return self.clip_key


@dataclass(frozen=True)
class _Object:
    shape: str
    first: int  # first visible frame
    last: int  # last visible frame (inclusive)
    colors: tuple[str, ...]  # colour per visible frame
    xs: tuple[float, ...]  # x centre per visible frame
    y: float
    r: float

    def visible(self, t: int) -> bool:
        return self.first <= t <= self.last


def _make_objects(rng: np.random.Generator) -> list[_Object]:
    """2-3 objects (index 0 = the mover) with distinct shapes, colours and start frames."""
    n = int(rng.integers(2, 4))
    shapes = [str(s) for s in rng.choice(SHAPES, size=n, replace=False)]
    palette = [str(c) for c in rng.choice(list(COLORS), size=n + 1, replace=False)]
    # distinct start frames, the earliest at 0; each object stays >= 2 frames
    starts = [0] + sorted(int(v) for v in rng.choice(np.arange(1, FRAMES - 2), size=n - 1, replace=False))
    starts = [starts[i] for i in rng.permutation(n)]
    objects = []
    for i, (shape, first) in enumerate(zip(shapes, starts)):
        last = int(rng.integers(first + 1, FRAMES))
        length = last - first + 1
        r = float(rng.uniform(12, 16))
        if i == 0:  # the mover: middle band, slides >= 40 px, may change colour once
            x0, x1 = float(rng.uniform(20, 36)), float(rng.uniform(76, 92))
            if rng.integers(2):
                x0, x1 = x1, x0
            xs = tuple(float(v) for v in np.linspace(x0, x1, length))
            start_color = palette[0]
            end_color = palette[n] if rng.integers(2) else start_color
            switch = int(rng.integers(1, length)) if end_color != start_color else length
            colors = tuple(start_color if k < switch else end_color for k in range(length))
            objects.append(_Object(shape, first, last, colors, xs, _BANDS[1], r))
        else:  # still objects: one in the top band, one in the bottom band
            x = float(rng.uniform(20, FRAME_SIZE - 20))
            objects.append(_Object(shape, first, last, (palette[i],) * length, (x,) * length, _BANDS[2 * (i - 1)], r))
    return objects


def _render(objects: list[_Object], background: tuple[int, int, int]) -> tuple[Image.Image, ...]:
    frames = []
    for t in range(FRAMES):
        image = Image.new("RGB", (FRAME_SIZE * _SUPERSAMPLE,) * 2, background)
        draw = ImageDraw.Draw(image)
        for obj in objects:
            if obj.visible(t):
                k = t - obj.first
                _draw_shape(draw, obj.shape, obj.xs[k], obj.y, obj.r, COLORS[obj.colors[k]])
        frames.append(image.resize((FRAME_SIZE, FRAME_SIZE), Image.Resampling.LANCZOS))
    return tuple(frames)


def _questions(rng: np.random.Generator, objects: list[_Object]) -> list[tuple[str, str, str]]:
    """(question, answer, qtype) rows for one clip: one of each type, colour at the start or the end."""
    mover = objects[0]
    by_start = sorted(objects, key=lambda o: o.first)
    rows = []
    if rng.integers(2):
        rows.append(("which shape appears first?", by_start[0].shape, "order"))
    else:
        rows.append(("which shape appears last?", by_start[-1].shape, "order"))
    still = objects[1 + int(rng.integers(len(objects) - 1))]
    rows.append((f"how many frames show a {still.colors[0]} shape?", str(still.last - still.first + 1), "count"))
    if rng.integers(2):
        rows.append(("what color is the moving shape at the start?", mover.colors[0], "color"))
    else:
        rows.append(("what color is the moving shape at the end?", mover.colors[-1], "color"))
    rows.append((f"does the {mover.shape} move left or right?", "right" if mover.xs[-1] > mover.xs[0] else "left",
                 "direction"))
    present = {o.shape for o in objects}
    absent = [s for s in SHAPES if s not in present]
    # 3-object clips contain every shape; 2-object clips mostly ask the absent one, for a yes/no balance
    asked = absent[0] if absent and rng.random() < 0.8 else str(rng.choice(sorted(present)))
    rows.append((f"is there a {asked} in any frame?", "yes" if asked in present else "no", "presence"))
    return rows


def _every_question(objects: list[_Object]) -> list[tuple[str, str, str]]:
    """Every question the clip supports (for training): both order and both colour questions, a count for
    each still object and presence for each shape; no random choice (the clip stream stays the same)."""
    mover, by_start = objects[0], sorted(objects, key=lambda o: o.first)
    present = {o.shape for o in objects}
    return [("which shape appears first?", by_start[0].shape, "order"),
            ("which shape appears last?", by_start[-1].shape, "order"),
            *[(f"how many frames show a {o.colors[0]} shape?", str(o.last - o.first + 1), "count") for o in objects[1:]],
            ("what color is the moving shape at the start?", mover.colors[0], "color"),
            ("what color is the moving shape at the end?", mover.colors[-1], "color"),
            (f"does the {mover.shape} move left or right?", "right" if mover.xs[-1] > mover.xs[0] else "left", "direction"),
            *[(f"is there a {shape} in any frame?", "yes" if shape in present else "no", "presence") for shape in SHAPES]]


_START_END = {"what color is the moving shape at the start?": "what color is the moving shape at the end?",
              "what color is the moving shape at the end?": "what color is the moving shape at the start?"}


def played_backwards(rows: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """The (question, answer, qtype) rows of a clip, re-asked of the same frames in reverse order (a training
    augmentation that is exact on cached per-frame features): direction flips, the colour at the start is the
    one at the end, count and presence stay. Order rows are dropped: "which shape appears first?" played
    backwards asks which object is visible last, which the forward rows do not tell."""
    flipped = []
    for question, answer, qtype in rows:
        if qtype == "direction":
            flipped.append((question, "left" if answer == "right" else "right", qtype))
        elif qtype == "color":
            flipped.append((_START_END[question], answer, qtype))
        elif qtype != "order":
            flipped.append((question, answer, qtype))
    return flipped


def clips(split: str, n: int, seed: int = 0, every_question: bool = False) -> list[ClipItem]:
    """Questions (5 each, one per type) about `n` generated clips, deterministic in (split, seed).

    split: "train", "test" or "heldout" (different random streams of the same seed: no shared clip).
    every_question: ask all 9-10 questions each clip supports instead (the same clips; for training).
    """
    if split not in _SPLIT_STREAM:
        raise ValueError(f"split must be one of {', '.join(map(repr, _SPLIT_STREAM))}, got {split!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split]])
    items = []
    for k in range(n):
        objects = _make_objects(rng)
        background = tuple(int(v) for v in rng.integers(225, 256, size=3))
        frames = _render(objects, background)
        rows = _questions(rng, objects)  # consumes the stream even when replaced: the clips stay the same
        for question, answer, qtype in (_every_question(objects) if every_question else rows):
            items.append(ClipItem(frames, question, answer, qtype, f"clips-{split}-{seed}-{k}"))
    return items


def load_clip_dir(directory: str, read_video: Callable[[str, int], list[Image.Image]], num_frames: int = FRAMES,
                  prefix: str = "") -> list[ClipItem]:
    """Items of a directory of the users' own clips, in the image datasets' layout with videos:
    `questions.json`, a JSON list of `[question, answer, N]` rows, and for each N either `videos/N/`
    (a folder of frame images, in file-name order) or one file `videos/N.<ext>` (GIF, MP4, ... read by
    `read_video(path, num_frames)`, e.g. `leanvlm.hub.load_video`). `num_frames` frames are sampled
    uniformly (first and last included). ValueError naming the file and row for anything malformed.
    """
    path = os.path.join(directory, "questions.json")
    videos_dir = os.path.join(directory, "videos")
    loaded: dict[int, tuple[Image.Image, ...]] = {}
    items = []
    for number, question, answer, clip_id in read_question_rows(path, "clip"):
        if clip_id not in loaded:
            loaded[clip_id] = tuple(_read_clip(videos_dir, clip_id, read_video, num_frames, f"{path}: row {number}"))
        qtype = _clip_question_type(answer)
        items.append(ClipItem(loaded[clip_id], question, answer, qtype, f"{prefix}{clip_id}"))
    return items


def _read_clip(videos_dir: str, clip_id: int, read_video, num_frames: int, where: str) -> list[Image.Image]:
    folder = os.path.join(videos_dir, str(clip_id))
    try:
        if os.path.isdir(folder):
            names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
            if not names:
                raise ValueError("the folder has no frames")
            picked = [names[round(i * (len(names) - 1) / max(num_frames - 1, 1))] for i in range(min(num_frames, len(names)))]
            frames = []
            for name in picked:
                with Image.open(os.path.join(folder, name)) as im:
                    frames.append(im.convert("RGB"))
            return frames
        files = [n for n in os.listdir(videos_dir) if os.path.splitext(n)[0] == str(clip_id)] if os.path.isdir(videos_dir) else []
        if not files:
            raise ValueError(f"neither {folder}/ nor {folder}.<gif|mp4|...> exists")
        frames = read_video(os.path.join(videos_dir, files[0]), num_frames)
        if not frames:
            raise ValueError("the video has no frames")
        return frames
    except (OSError, ValueError, ImportError) as error:
        raise ValueError(f"{where} needs clip {clip_id}, which cannot be read ({error})") from error


def _clip_question_type(answer: str) -> str:
    """Question type of a user's clip question, from its answer: "direction", "count" (2-8), else the
    image datasets' types (shape / color / yes/no / other)."""
    if answer in DIRECTIONS:
        return "direction"
    if answer in CLIP_COUNTS:
        return "count"
    return question_type(answer)

"""`leanvlm show` (render a method's reduction from `method.stats`) and the demo's bundled image."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from leanvlm.cli.common import CLIError, describe_method

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _display_frame(image: Image.Image, grid: tuple[int, int], processor: Any) -> np.ndarray:
    """The part of the image the patch grid covers: center-cropped to the grid's aspect ratio when the
    model's image processor center-crops (CLIP-style), else the whole (resized) image."""
    image_processor = getattr(processor, "image_processor", None)
    if getattr(image_processor, "do_center_crop", False):
        h, w = grid
        width, height = image.size
        target = w / h
        if width / height > target:
            new_width = round(height * target)
            left = (width - new_width) // 2
            image = image.crop((left, 0, left + new_width, height))
        else:
            new_height = round(width / target)
            top = (height - new_height) // 2
            image = image.crop((0, top, width, top + new_height))
    return np.asarray(image.convert("RGB"))


def _square_grid(tokens: int) -> tuple[int, int]:
    side = math.isqrt(tokens)
    return (side, side) if side * side == tokens else (1, tokens)


def frames_of(media: tuple[str, Any]) -> list[Image.Image]:
    kind, content = media
    return list(content) if kind == "video" else [content]


def render_show(loaded: Any, method: Any, method_name: str, media: tuple[str, Any], stats: Any, out: Path,
                dpi: int = 100) -> dict[str, Any]:
    """Draw the reduction of sample 0 of the last prefill (`stats`, with its `visual_items`) over the input
    frames and write `out`. -> counts and the PNG's pixel size."""
    from leanvlm.viz import expected_size, reduction_figure, save_png

    if stats is None or not stats.samples:
        raise CLIError("the method recorded no statistics (no prompt ran)")
    sample = stats.samples[0]
    pictures = frames_of(media)
    grids, groups, origins = [], [], []
    items = [item for item in getattr(stats, "visual_items", []) or [] if item.sample == 0]
    for item in items:
        for frame_groups, frame_origin in zip(item.groups, item.origin):
            grids.append(tuple(item.grid))
            groups.append(frame_groups.cpu().numpy())
            origins.append(frame_origin.cpu().numpy())
    if not items:  # no pre-LLM stage ran: every patch went into the LLM as its own token
        per_frame = sample.visual_in // max(len(pictures), 1)
        grid = _square_grid(per_frame)
        for _ in pictures:
            grids.append(grid)
            groups.append(np.arange(grid[0] * grid[1]))
            origins.append(np.arange(grid[0] * grid[1]))
    if len(grids) != len(pictures):
        if len(grids) % len(pictures) == 0:  # e.g. several crops per image: repeat the picture
            pictures = [p for p in pictures for _ in range(len(grids) // len(pictures))]
        else:
            pictures = [pictures[min(i, len(pictures) - 1)] for i in range(len(grids))]
    images = [_display_frame(p, g, loaded.processor) for p, g in zip(pictures, grids)]
    base_tokens = sample.layer_tokens[0] + sample.visual_in - sample.visual_into_llm
    title = method_name if method is None else describe_method(method)
    depths = frame_depths(stats, groups, len(sample.layer_tokens))
    fig = reduction_figure(images, grids, groups, origins, sample.layer_tokens, sample.layer_visual_tokens, title,
                           sample.visual_in, sample.visual_into_llm, sample.flops_ratio, base_tokens, depths)
    width, height = expected_size(fig, dpi)
    save_png(fig, out, dpi)
    return {"frames": len(images), "width": width, "height": height, "visual_in": sample.visual_in,
            "visual_into_llm": sample.visual_into_llm, "in_llm_panels": depths is not None}


def frame_depths(stats: Any, groups: list[np.ndarray], num_layers: int) -> list[np.ndarray] | None:
    """Per frame, `viz.patch_depth` from sample 0's `stats.visual_depth`, or None when no in-LLM stage
    dropped a visual token (or the token counts do not line up with the frames)."""
    from leanvlm.viz import patch_depth

    per_sample = getattr(stats, "visual_depth", None) or []
    if not per_sample:
        return None
    depth = np.asarray(per_sample[0], dtype=np.int64)
    counts = [int(g.max()) + 1 if (g >= 0).any() else 0 for g in groups]
    if depth.size != sum(counts) or depth.size == 0 or bool((depth >= num_layers).all()):
        return None
    out, start = [], 0
    for frame_groups, count in zip(groups, counts):
        out.append(patch_depth(frame_groups, depth[start:start + count]))
        start += count
    return out


def demo_clip() -> tuple[list[Image.Image], str, str, str]:
    """(frames, question, where it came from, expected answer) for `leanvlm demo --video`: the clip of
    real_model/assets/demo_clip.json ({"video", "question", "answer", "source"})."""
    from leanvlm import real_model
    from leanvlm.hub import load_video

    assets = Path(real_model.__file__).parent / "assets"
    data = json.loads((assets / "demo_clip.json").read_text())
    return load_video(assets / data["video"]), data["question"], data["source"], data["answer"]


def demo_image() -> tuple[Image.Image, str, str, str | None]:
    """(image, question, where it came from, expected answer or None) for `leanvlm demo`: real_model/assets/
    demo.json ({"image", "question", "answer", "source"}) if present, else the first image there (asking what
    color the shape is), else a generated test scene and one of its questions."""
    from leanvlm import real_model

    assets = Path(real_model.__file__).parent / "assets"
    spec = assets / "demo.json"
    if spec.is_file():
        data = json.loads(spec.read_text())
        path = assets / data.get("image", "demo.png")
        with Image.open(path) as im:
            return im.convert("RGB"), data["question"], data.get("source", str(path)), data.get("answer")
    pictures = sorted(p for p in assets.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if assets.is_dir() else []
    if pictures:
        with Image.open(pictures[0]) as im:
            return im.convert("RGB"), "what color is the shape?", str(pictures[0]), None
    from leanvlm.real_model.data import scenes

    item = scenes("test", 1)[0]
    return item.image, item.question, "generated scene (real_model.data.scenes('test', 1)[0])", item.answer

"""AIM's layer schedule for progressive pruning inside the LLM (SPEC 1b), and its per-modality defaults.

`progressive_keep(l, l1, l2)` is the fraction of the visual tokens that entered the LLM which is still
kept AFTER decoder layer `l`: layers 0..l1 see all of them, layer l1 + 1 sees keep(l1), and every layer
>= l2 sees none. Turning the fraction into a token count (rounding) is the caller's business.

Defaults per modality (`default_merge_keep`, `default_prune_layers`): videos keep the SPEC's (merge every
frame to 25%, prune from half the depth); images merge to 20% and prune later, as measured on the bundled
30-layer image and video models (docs/methods/aim.md: on held-out scenes the SPEC's schedule lost images
1.6 / 2.2 points at 3.89x, this one 0.3 points pooled over three draws at 4.13x; on clips it lost video 3.0 /
4.5 points).
"""

from __future__ import annotations

import math
from typing import Literal

Modality = Literal["image", "video"]

# Depths with a published default (SPEC 1b). 32 is LLaVA-1.5-7B's; the depth formula would give (16, 25).
_PUBLISHED_DEFAULTS: dict[int, tuple[int, int]] = {28: (14, 22), 32: (13, 21)}
#: (l1 / L, l2 / L) of the video window at depths without a published default, and of the image window
_VIDEO_WINDOW = (0.5, 0.79)
_IMAGE_WINDOW = (0.6, 0.87)
_MERGE_KEEP: dict[str, float] = {"image": 0.2, "video": 0.25}


def check_modality(kind: str) -> None:
    if kind not in _MERGE_KEEP:
        raise ValueError(f"modality must be 'image' or 'video', got {kind!r}")


def default_merge_keep(kind: Modality) -> float:
    """AIM's default merge ratio per frame: 0.25 for video frames (SPEC), 0.2 for images (measured)."""
    check_modality(kind)
    return _MERGE_KEEP[kind]


def progressive_keep(layer: int, l1: int, l2: int) -> float:
    """Fraction of the LLM's visual tokens kept after decoder layer `layer` (0-based).

    keep(l) = 1 for l < l1;  keep(l) = clip(1 - (l - l1 + 1) / (l2 - l1), 0, 1) for l >= l1.
    Raises ValueError for negative arguments or l2 <= l1.
    """
    if layer < 0 or l1 < 0 or l2 < 0:
        raise ValueError(f"layer, l1 and l2 must be >= 0, got layer={layer}, l1={l1}, l2={l2}")
    if l2 <= l1:
        raise ValueError(f"need l2 > l1, got l1={l1}, l2={l2}")
    if layer < l1:
        return 1.0
    return min(1.0, max(0.0, 1.0 - (layer - l1 + 1) / (l2 - l1)))


def _round_half_up(value: float) -> int:
    # Python's round() is half-to-even (round(1.5) == round(2.5) == 2); half-up keeps l1 monotone in depth.
    return math.floor(value + 0.5)


def default_prune_layers(num_layers: int, kind: Modality = "video") -> tuple[int, int]:
    """Default (l1, l2) for a decoder with `num_layers` layers and inputs of this modality.

    Video (the SPEC's): 28 -> (14, 22) (LLaVA-OneVision-7B) and 32 -> (13, 21) (LLaVA-1.5-7B) are the
    published defaults, keyed by depth only (any 32-layer model gets LLaVA-1.5's); other depths scale:
    l1 = round(0.5 L), l2 = round(0.79 L). Images (measured on the bundled model): l1 = round(0.6 L),
    l2 = round(0.87 L) at every depth (30 -> (18, 26)). Rounding half up; for very shallow models l1 is capped
    at L - 1 and l2 raised to l1 + 1 (L = 1 -> (0, 1)), so 0 <= l1 < l2 <= L always holds.
    """
    check_modality(kind)
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if kind == "video" and num_layers in _PUBLISHED_DEFAULTS:
        return _PUBLISHED_DEFAULTS[num_layers]
    start, stop = _VIDEO_WINDOW if kind == "video" else _IMAGE_WINDOW
    l1 = min(_round_half_up(start * num_layers), num_layers - 1)
    l2 = min(max(_round_half_up(stop * num_layers), l1 + 1), num_layers)
    return l1, l2


def prune_window(num_layers: int, kind: Modality = "video", l1: int | None = None,
                 l2: int | None = None) -> tuple[int, int]:
    """(l1, l2) with the None ones taken from `default_prune_layers(num_layers, kind)`. A default next to a
    given bound moves to keep l1 < l2 (l1=25 alone on a 30-layer model: l2 = 26 for video, whose default l2
    is 24), so one bound fits every modality. Not validated: the caller checks the result against its model."""
    default_l1, default_l2 = default_prune_layers(num_layers, kind)
    if l1 is not None and l2 is None:
        return l1, max(default_l2, l1 + 1)
    if l2 is not None and l1 is None:
        return min(default_l1, l2 - 1), l2
    return (default_l1, default_l2) if l1 is None else (l1, l2)

"""AIM's layer schedule for progressive pruning inside the LLM (SPEC 1b).

`progressive_keep(l, l1, l2)` is the fraction of the visual tokens that entered the LLM which is still
kept AFTER decoder layer `l`: layers 0..l1 see all of them, layer l1 + 1 sees keep(l1), and every layer
>= l2 sees none. Turning the fraction into a token count (rounding) is the caller's business.
"""

from __future__ import annotations

import math

# Depths with a published default (SPEC 1b). 32 is LLaVA-1.5-7B's; the depth formula would give (16, 25).
_PUBLISHED_DEFAULTS: dict[int, tuple[int, int]] = {28: (14, 22), 32: (13, 21)}


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


def default_prune_layers(num_layers: int) -> tuple[int, int]:
    """Default (l1, l2) for a decoder with `num_layers` layers.

    28 -> (14, 22) (LLaVA-OneVision-7B) and 32 -> (13, 21) (LLaVA-1.5-7B) are the SPEC's published
    defaults, keyed by depth only (any 32-layer model gets LLaVA-1.5's). Other depths scale:
    l1 = round(0.5 L), l2 = round(0.79 L), rounding half up; for very shallow models l1 is capped at L - 1
    and l2 raised to l1 + 1 (L = 1 -> (0, 1), L = 3 -> (2, 3)), so 0 <= l1 < l2 <= L always holds.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if num_layers in _PUBLISHED_DEFAULTS:
        return _PUBLISHED_DEFAULTS[num_layers]
    l1 = min(_round_half_up(0.5 * num_layers), num_layers - 1)
    l2 = max(_round_half_up(0.79 * num_layers), l1 + 1)
    return l1, l2

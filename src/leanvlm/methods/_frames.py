"""Shared bookkeeping of the pre-LLM peer methods: per-frame signal lookup and rebuilding a `VisualItem`
after a frame's tokens were merged into groups (pure pruning uses `VisualItem.select`)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from leanvlm.ops.select import FILLER
from leanvlm.runtime.visual import VisualItem


@dataclass
class FrameGroups:
    """How one frame of T current tokens became K output tokens.

    tokens [K, C]: the output tokens; representative [K] long: the current token each output stands for
    (its origin becomes the output's origin); assignment [T] long: output slot of every current token,
    -1 = dropped. Outputs may come in any order: `rebuild` sorts them by origin.
    """

    tokens: torch.Tensor
    representative: torch.Tensor
    assignment: torch.Tensor

    @classmethod
    def identity(cls, frame: torch.Tensor) -> FrameGroups:
        ident = torch.arange(frame.shape[0], device=frame.device)
        return cls(frame, ident, ident)


def frame_signal(item: VisualItem, name: str, frame: int, stage: str) -> torch.Tensor:
    """The vision signal `name` for the CURRENT tokens of `frame` ([T] or [T, D]), looked up through
    `origin` (a token already merged by an earlier stage reads its representative's value)."""
    if name not in item.signals:
        raise ValueError(f"{stage} needs the vision-tower signal {name!r}, which this model's adapter did not provide")
    return item.signals[name][frame][item.origin[frame]]


def rebuild(item: VisualItem, frames: list[FrameGroups]) -> VisualItem:
    """The item with every frame replaced by its groups, outputs in ascending origin (raster) order, and
    `groups` composed so that every original patch points at the output token it ended in (-1 dropped)."""
    new_frames, origin, groups = [], [], []
    for result, org, grp in zip(frames, item.origin, item.groups):
        out_origin = org[result.representative]
        order = torch.argsort(out_origin, stable=True)
        # one spare last slot holding FILLER: index -1 (dropped) reads it, also when a frame keeps nothing
        position = torch.full((order.numel() + 1,), FILLER, dtype=order.dtype, device=order.device)
        position[order] = torch.arange(order.numel(), device=order.device)
        assignment = torch.cat([position[result.assignment], position[-1:]])
        new_frames.append(result.tokens[order])
        origin.append(out_origin[order])
        groups.append(assignment[grp])
    return replace(item, frames=new_frames, origin=origin, groups=groups)

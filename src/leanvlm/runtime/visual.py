"""Pre-LLM side: visual tokens per image / video frame, and shrinking the LLM input to match them."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from leanvlm.ops.select import FILLER, gather_slots, pack_right


@dataclass
class VisualItem:
    """One image or one video of the batch as the projector produced it, frame by frame.

    frames: per frame [T_f, C] tokens (an image is one frame). grid: (h, w) patch grid of every frame
    before any reduction. origin: per frame [T_f] long, the original patch index (row-major in the grid)
    each token stands for (a merged token: its destination), ascending. groups: per frame [h*w] long, the
    output token each original patch ended in, -1 if dropped. signals: vision-tower signals a stage asked
    for, each [F, h*w] (e.g. "cls_attention"). sample: the batch row the item belongs to. instruction: [M, D]
    LLM input embeddings of the sample's instruction tokens (`TokenLayout.question`), set only when a stage
    needs `stages.INSTRUCTION`. crops: [h*w] long or None, for an item stitched from several vision-encoder
    crops (the anyres high-resolution grid of LLaVA-NeXT / OneVision): the crop each grid cell came from
    (0-based, in the model's tile order); None when the item is one crop (or one image / frame of its own).
    """

    frames: list[torch.Tensor]
    grid: tuple[int, int]
    origin: list[torch.Tensor]
    groups: list[torch.Tensor]
    sample: int
    kind: str = "image"
    signals: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    instruction: torch.Tensor | None = None
    crops: torch.Tensor | None = None

    @classmethod
    def from_frames(cls, frames: torch.Tensor | list[torch.Tensor], grid: tuple[int, int], sample: int, kind: str = "image",
                    signals: dict[str, torch.Tensor] | None = None, crops: torch.Tensor | None = None) -> VisualItem:
        """Unreduced item: frames [F, T, C] (or a list of [T, C]) with T == h * w; crops [h * w] or None."""
        frames = list(frames)
        ident = [torch.arange(f.shape[0], device=f.device) for f in frames]
        return cls(frames=frames, grid=grid, origin=ident, groups=[i.clone() for i in ident], sample=sample, kind=kind,
                   signals=dict(signals or {}), crops=crops)

    @property
    def num_tokens(self) -> int:
        return sum(f.shape[0] for f in self.frames)

    def run_offsets(self) -> torch.Tensor:
        """[num_tokens] long: the placeholder each token stands for, counted within the item's unreduced run of
        F * h * w placeholders (frame f's tokens at f * h * w + origin), for families whose run holds exactly
        the item's patches, frame by frame in raster order (no separators)."""
        cells = self.grid[0] * self.grid[1]
        return torch.cat([origin + frame * cells for frame, origin in enumerate(self.origin)])

    def sizes(self) -> torch.Tensor:
        """[num_tokens] float32: how many original patches each token stands for (1 for a token no merge reached;
        a merged token counts its whole group)."""
        return torch.cat([torch.bincount(group[group >= 0], minlength=frame.shape[0]).float()
                          for frame, group in zip(self.frames, self.groups)])

    def select(self, keep: list[torch.Tensor]) -> VisualItem:
        """Keep, per frame, the tokens at ascending indices keep[f] [K_f] (a pure prune, no merging)."""
        frames, origin, groups = [], [], []
        for frame, org, grp, idx in zip(self.frames, self.origin, self.groups, keep):
            frames.append(frame[idx])
            origin.append(org[idx])
            new_position = torch.full((frame.shape[0],), FILLER, dtype=torch.long, device=frame.device)
            new_position[idx] = torch.arange(idx.shape[0], device=frame.device)
            groups.append(torch.where(grp >= 0, new_position[grp.clamp(min=0)], grp))
        return replace(self, frames=frames, origin=origin, groups=groups)


@dataclass
class ShrunkSequence:
    """The LLM input after pre-LLM reduction, re-left-padded.

    kept [B, L'] long: the original position of every new slot (-1 = new padding). removed [B] long:
    placeholders removed per sample. original_positions: whether position_ids are the kept slots' original
    positions (decoding then continues from the original length), rather than moved down by the
    placeholders removed before each token (contiguous; decode positions shift down by `removed`).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    kept: torch.Tensor
    removed: torch.Tensor
    position_ids: torch.Tensor | None
    original_positions: bool = False


def shrink_placeholders(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    placeholder: torch.Tensor,
    old_counts: list[int],
    new_counts: list[int],
    pad_token_id: int,
    run_offsets: list[torch.Tensor] | None = None,
) -> ShrunkSequence:
    """Remove placeholders so that the k-th visual item keeps new_counts[k] of its old_counts[k].

    input_ids [B, L]; attention_mask [B, L] or None; position_ids [B, L] (1-D RoPE) or None;
    placeholder [B, L] bool marks the visual placeholders, whose row-major order matches the items' order.
    Without run_offsets each item keeps the first new_counts[k] placeholders of its run (their content is
    identical; only the count matters), and given position_ids move down by the number of placeholders
    removed before each token, so text keeps its spacing and positions stay contiguous. With run_offsets
    (per item [new_counts[k]] ascending, the placeholder within its run each kept token stands for, e.g.
    `VisualItem.run_offsets`) exactly those placeholders stay and every kept slot keeps its original position
    (position_ids, or 0..L-1 when None, as the model would number them): a merged token sits where its patch
    was and the text after the image where it was. Padding is rebuilt on the left.
    """
    batch, length = input_ids.shape
    valid = torch.ones_like(placeholder) if attention_mask is None else attention_mask.bool()
    flat = placeholder.reshape(-1).nonzero().squeeze(1)  # row-major placeholder positions
    if flat.numel() != sum(old_counts):
        raise ValueError(f"found {flat.numel()} visual placeholder tokens in input_ids but the visual features have {sum(old_counts)}")
    drop_flat = torch.zeros(batch * length, dtype=torch.bool, device=input_ids.device)
    start = 0
    for k, (old, new) in enumerate(zip(old_counts, new_counts)):
        if run_offsets is None:
            drop_flat[flat[start + new : start + old]] = True
        else:
            if run_offsets[k].shape != (new,):
                raise ValueError(f"visual item {k} keeps {new} tokens but has {tuple(run_offsets[k].shape)} run offsets")
            drop_flat[flat[start : start + old]] = True
            drop_flat[flat[start + run_offsets[k].to(flat.device)]] = False
        start += old
    dropped = drop_flat.view(batch, length)
    keep = valid & ~dropped
    kept = pack_right(keep)
    new_ids = gather_slots(input_ids, kept, fill=pad_token_id)
    new_mask = (kept >= 0).long()
    new_positions = None
    if run_offsets is not None:
        if position_ids is None:
            position_ids = torch.arange(length, device=input_ids.device)[None]
        new_positions = gather_slots(position_ids.expand(batch, length), kept, fill=0)
    elif position_ids is not None:
        shifted = position_ids.expand(batch, length) - torch.cumsum(dropped.long(), dim=1)
        new_positions = gather_slots(shifted, kept, fill=0)
    return ShrunkSequence(new_ids, new_mask, kept, dropped.sum(dim=1), new_positions, run_offsets is not None)

"""Evaluation throughput: questions grouped by image, the vision tower run once per distinct image, and
the plain model's prompt prefix (system turn + image tokens) computed once for all the questions about it.

- `group_by_image` / `plan_batches`: batches made of whole image groups (a group is never split), so a
  batch repeats each image for its several questions.
- `SharedVisionEncoding`: while active, the vision tower computes each distinct image of a batch once and
  its outputs are copied to the rows that repeat it (any method whose pre-LLM stages ask for no
  vision-tower signals; those that do read the tower's internals row by row).
- `shared_prefix_last_logits`: the plain model's last-position logits for a left-padded batch, computing the
  common prefix of each image group's prompts once (KV cache, `Cache.batch_select_indices` to give each
  question its image's rows) and then only each question's own tokens, rows of similar length together (less
  padding). Equal to the one-by-one forward up to float rounding (tests/test_eval_batching.py).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from leanvlm.compat import cache_keyword, cache_of

#: what one more suffix forward costs, in padded tokens: the fixed cost of a forward plus the lower matmul
#: efficiency of a few short rows (a guess for small LLMs on CPU; only where the suffix is split depends on it)
FORWARD_COST_TOKENS = 64


# ------------------------------------------------------------------------------------------------ batches
def image_key(item: Any) -> Any:
    """What identifies an item's image: its `image_key` if it has one, else the image object itself."""
    key = getattr(item, "image_key", None)
    return key if key is not None else id(item.image)


def group_by_image(items: Sequence[Any]) -> list[list[int]]:
    """Indices of the items, grouped by image (groups in first-seen order, items in order within one)."""
    groups: dict[Any, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(image_key(item), []).append(index)
    return list(groups.values())


def plan_batches(groups: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Whole groups packed in order into batches of at most `batch_size` items; a group larger than
    `batch_size` is a batch of its own (its image's prefix is then still computed once)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches: list[list[int]] = []
    current: list[int] = []
    for group in groups:
        if current and len(current) + len(group) > batch_size:
            batches.append(current)
            current = []
        current = current + list(group)
    if current:
        batches.append(current)
    return batches


# ------------------------------------------------------------------------------------------ vision tower
def _pick_rows(value: Any, rows: torch.Tensor, batch: int) -> Any:
    """`value` with its leading batch dimension (size `batch`) indexed by `rows`; tuples, lists and dicts
    (a transformers ModelOutput) element-wise; anything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, rows.to(value.device)) if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, dict):  # ModelOutput is an OrderedDict: update in place keeps its class and attributes
        for key in list(value.keys()):
            value[key] = _pick_rows(value[key], rows, batch)
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_pick_rows(v, rows, batch) for v in value)
    return value


class SharedVisionEncoding:
    """Context manager: `tower` computes each distinct image of a batch once.

    A forward pre-hook compares the rows of the pixel input [B, C, H, W] (exact equality), runs the tower on
    the distinct rows [G, C, H, W] and a forward hook copies its outputs back to [B, ...]. Other inputs
    (Qwen2-VL's flattened patches, a batch of 1, all rows distinct) run unchanged. `calls` / `rows_saved`
    count what it did.
    """

    def __init__(self, tower: nn.Module):
        self.tower = tower
        self._inverse: torch.Tensor | None = None
        self._handles: list[Any] = []
        self.calls = 0
        self.rows_saved = 0

    def _before(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        self._inverse = None
        pixels = args[0] if args else kwargs.get("pixel_values")
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or pixels.shape[0] < 2:
            return None
        distinct: list[int] = []  # row of each distinct image
        inverse: list[int] = []  # [B] position in `distinct` of each row
        for row in range(pixels.shape[0]):
            for position, first in enumerate(distinct):
                if torch.equal(pixels[row], pixels[first]):
                    inverse.append(position)
                    break
            else:
                distinct.append(row)
                inverse.append(len(distinct) - 1)
        if len(distinct) == pixels.shape[0]:
            return None
        self.calls += 1
        self.rows_saved += pixels.shape[0] - len(distinct)
        self._inverse = torch.tensor(inverse)
        unique = pixels[distinct]
        if args:
            return (unique, *args[1:]), kwargs
        return args, {**kwargs, "pixel_values": unique}

    def _after(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        inverse, self._inverse = self._inverse, None
        if inverse is None:
            return None
        return _pick_rows(output, inverse, int(inverse.max()) + 1)

    def __enter__(self) -> SharedVisionEncoding:
        self._handles = [self.tower.register_forward_pre_hook(self._before, with_kwargs=True),
                         self.tower.register_forward_hook(self._after, with_kwargs=True)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._inverse = None


# --------------------------------------------------------------------------------------- shared prefix
def _common_prefix(rows: Sequence[torch.Tensor]) -> int:
    """Length of the longest common prefix of 1-D id tensors."""
    length = min(r.numel() for r in rows)
    for row in rows[1:]:
        differ = (row[:length] != rows[0][:length]).nonzero()
        if differ.numel():
            length = int(differ[0, 0])
    return length


@torch.no_grad()
def shared_prefix_last_logits(
    model: nn.Module,
    inputs: dict[str, Any],
    group_ids: Sequence[int],
    visual_token_ids: Sequence[int],
    forward_cost: int = FORWARD_COST_TOKENS,
) -> torch.Tensor | None:
    """Last-position logits [B, V] of the plain model on a left-padded batch (input_ids / attention_mask
    [B, T], pixel_values [B, ...] one image per row), computing each group's common prompt prefix once.

    group_ids [B]: rows with the same id ask about the same image. Each group's prefix (the longest common
    prefix of its rows' unpadded ids, at least one own token left per row) runs as one row of a prefix
    batch [G, P] with its image, then every row's remaining tokens run on the prefix's KV cache, in buckets
    of similar length (`length_buckets` with `forward_cost`; each [R, S] padded before the tokens to its
    longest row). All groups use one prefix length P, the shortest group's common prefix; every visual
    token must be inside it, None when that does not hold (the caller runs the whole batch instead).
    """
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    rows = [ids[b][mask[b].bool()] for b in range(ids.shape[0])]
    order: dict[int, list[int]] = {}
    for b, group in enumerate(group_ids):
        order.setdefault(group, []).append(b)
    members = list(order.values())
    # one prefix length for all groups: the shortest group's (a group whose questions also share their first
    # words has a longer common prefix; its first P tokens are still common to its rows)
    prefix_length = min(min(_common_prefix([rows[b] for b in group]), min(rows[b].numel() for b in group) - 1)
                        for group in members)
    visual = torch.tensor(list(visual_token_ids), device=ids.device)
    for row in rows:
        where = torch.isin(row, visual).nonzero()
        if where.numel() and int(where[-1, 0]) >= prefix_length:
            return None
    firsts = [group[0] for group in members]
    keyword = cache_keyword(model.forward)
    pixels = inputs["pixel_values"][firsts]
    prefix_ids = torch.stack([rows[b][:prefix_length] for b in firsts])  # [G, P]
    prefix_out = model(input_ids=prefix_ids, pixel_values=pixels, use_cache=True, logits_to_keep=1)
    cache = cache_of(prefix_out)
    # row b of the batch reads its group's prefix: [B] index into the prefix batch
    group_row = torch.empty(ids.shape[0], dtype=torch.long)
    for position, group in enumerate(members):
        group_row[group] = position
    suffixes = [rows[b][prefix_length:] for b in range(ids.shape[0])]
    pad = model.config.get_text_config().pad_token_id
    pad = 0 if pad is None else pad
    buckets = length_buckets([s.numel() for s in suffixes], forward_cost)
    logits: list[torch.Tensor | None] = [None] * ids.shape[0]
    for number, bucket in enumerate(buckets):
        # each bucket reads its rows' prefixes from its own copy of the prefix cache (the last one takes it)
        rows_cache = cache if number == len(buckets) - 1 else copy.deepcopy(cache)
        rows_cache.batch_select_indices(group_row[bucket].to(ids.device))
        for b, row_logits in zip(bucket, _suffix_logits(model, [suffixes[b] for b in bucket], rows_cache, keyword,
                                                        prefix_length, pad, mask.dtype)):
            logits[b] = row_logits
    return torch.stack(logits)  # type: ignore[arg-type]


def length_buckets(lengths: Sequence[int], forward_cost: int = FORWARD_COST_TOKENS) -> list[list[int]]:
    """Rows (indices into `lengths`) split into buckets of similar length, each bucket one suffix forward
    padded to its longest row: the split minimising padded tokens + `forward_cost` tokens per forward
    (dynamic programme over the rows sorted by length). Equal lengths never split."""
    order = sorted(range(len(lengths)), key=lambda b: lengths[b])
    sorted_lengths = [lengths[b] for b in order]
    best = [0.0] + [float("inf")] * len(order)  # best[j]: cost of the j shortest rows
    start = [0] * (len(order) + 1)  # start[j]: first row of the last bucket in that best split
    for j in range(1, len(order) + 1):
        if j < len(order) and sorted_lengths[j] == sorted_lengths[j - 1]:
            continue  # a bucket never ends between two rows of one length
        for i in range(j):
            if best[i] == float("inf"):  # i splits a length
                continue
            cost = best[i] + (j - i) * sorted_lengths[j - 1] + forward_cost
            if cost < best[j]:
                best[j], start[j] = cost, i
    buckets, j = [], len(order)
    while j:
        buckets.append(order[start[j]:j])
        j = start[j]
    return buckets[::-1]


def _suffix_logits(model: nn.Module, suffixes: Sequence[torch.Tensor], cache: Any, keyword: str, prefix_length: int,
                   pad: int, mask_dtype: torch.dtype) -> torch.Tensor:
    """Last-position logits [R, V] of R rows' own tokens (suffixes, 1-D id tensors) on a cache holding
    each row's prefix of `prefix_length` tokens."""
    device = suffixes[0].device
    width = max(s.numel() for s in suffixes)
    suffix_ids = torch.full((len(suffixes), width), pad, dtype=suffixes[0].dtype, device=device)
    suffix_mask = torch.zeros((len(suffixes), prefix_length + width), dtype=mask_dtype, device=device)
    suffix_mask[:, :prefix_length] = 1
    positions = torch.empty((len(suffixes), width), dtype=torch.long, device=device)
    for b, suffix in enumerate(suffixes):
        # padded between the prefix and the row's own tokens (masked out), so every row ends at the last
        # column and only that position's logits are computed; real tokens continue from position P
        gap = width - suffix.numel()
        suffix_ids[b, gap:] = suffix
        suffix_mask[b, prefix_length + gap:] = 1
        positions[b] = torch.arange(prefix_length - gap, prefix_length + suffix.numel(), device=device)
    return model(input_ids=suffix_ids, attention_mask=suffix_mask, position_ids=positions.clamp(min=0),
                 **{keyword: cache}, use_cache=True, logits_to_keep=1).logits[:, -1]

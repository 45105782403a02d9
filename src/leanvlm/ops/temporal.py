"""Temporal structure of a video's tokens: segmenting frames, density peaks, nearest-centre clustering.

Pure tensor maths for the video methods (HoliTom, FastVID); no model knowledge.
- `consecutive_similarity(frames)`: cosine similarity of every patch position between consecutive frames.
- `static_windows(similarity, tau, max_window)`: HoliTom's segmentation, the partition of the frames into
  windows that maximises the number of tokens removable by temporal merging (dynamic programming).
- `transition_segments(global_features, min_segments, tau)`: FastVID's DySeg, cuts at the c - 1 least
  similar transitions and at every transition below tau.
- `density_peak_scores(x, k)`: DPC-kNN's score (local density times distance to a denser point).
- `top_indices(scores, count)`: the `count` highest scores, ties to the lower index (deterministic).
"""

from __future__ import annotations

import math

import torch


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp(min=1e-12)


def consecutive_similarity(frames: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each patch position between frame t and frame t + 1.

    frames [F, T, C] -> [F - 1, T] (float32 or wider). A zero vector has similarity 0 to everything.
    """
    if frames.dim() != 3:
        raise ValueError(f"need frames [F, T, C], got {tuple(frames.shape)}")
    unit = _unit(frames)
    return (unit[:-1] * unit[1:]).sum(dim=-1)


def static_counts(similarity: torch.Tensor, tau: float) -> torch.Tensor:
    """static[s, e] = how many patch positions stay similar (> tau) across every transition of frames
    s..e (e > s); 0 elsewhere. similarity [F - 1, T] -> [F, F] long."""
    frames = similarity.shape[0] + 1
    above = similarity > tau
    counts = torch.zeros(frames, frames, dtype=torch.long, device=similarity.device)
    for start in range(frames - 1):
        # still_static[j]: positions similar across every transition start..start + j
        still_static = torch.cumprod(above[start:].long(), dim=0)
        counts[start, start + 1:] = still_static.sum(dim=1)
    return counts


def static_windows(similarity: torch.Tensor, tau: float, max_window: int) -> tuple[list[tuple[int, int]], int]:
    """HoliTom's global redundancy-aware temporal segmentation.

    A window of frames [s, e] can keep ONE token for each of its static positions (similar > tau across
    every transition inside it), which removes static[s, e] * (e - s) tokens. Among all partitions of the
    frames into consecutive windows of at most `max_window` frames, this returns the one removing the most
    (dynamic programming over the last window's start), as ([(start, end), ...] inclusive, removed).
    Ties: a lone frame beats a window, a shorter last window beats a longer one.

    similarity [F - 1, T] (`consecutive_similarity`).
    """
    frames = similarity.shape[0] + 1
    index = torch.arange(frames, device=similarity.device)
    transitions = (index[None, :] - index[:, None]).clamp(min=0)  # [F, F]: e - s of the window [s, e]
    gain = (static_counts(similarity, tau) * transitions).tolist()  # gain[s][e]: tokens the window removes
    best = [0] * frames  # best[i]: most tokens removable from frames 0..i
    start_of_last = [0] * frames
    for end in range(frames):
        value, start = (best[end - 1] if end > 0 else 0), end
        for size in range(2, min(end + 1, max_window) + 1):
            first = end - size + 1
            candidate = (best[first - 1] if first > 0 else 0) + gain[first][end]
            if candidate > value:
                value, start = candidate, first
        best[end], start_of_last[end] = value, start
    windows = []
    end = frames - 1
    while end >= 0:
        windows.append((start_of_last[end], end))
        end = start_of_last[end] - 1
    return windows[::-1], best[-1]


def transition_segments(global_features: torch.Tensor, min_segments: int, tau: float) -> list[int]:
    """FastVID's dynamic temporal segmentation (DySeg): the lengths of consecutive segments of frames.

    The transition t (between frames t and t + 1) is a cut if it is among the min_segments - 1 least
    similar transitions (cosine of the frames' global features) or its similarity is below tau; so there
    are at least min(min_segments, F) segments. Ties among equally similar transitions: the earlier one.
    global_features [F, C] -> lengths summing to F.
    """
    frames = global_features.shape[0]
    if frames == 0:
        return []
    unit = _unit(global_features)
    similarity = (unit[:-1] * unit[1:]).sum(dim=-1)  # [F - 1]
    lowest = torch.sort(similarity, stable=True).indices[: max(0, min(min_segments - 1, frames - 1))]
    cuts = sorted(set(lowest.tolist()) | set((similarity < tau).nonzero().squeeze(1).tolist()))
    bounds = [-1, *cuts, frames - 1]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def top_indices(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` highest scores along the last dimension, ties to the lower index, in
    descending score order. scores [..., N] -> [..., count] long."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :count]


#: pairs whose Gram-form squared distance is below this fraction of |a|^2 + |b|^2 are recomputed from
#: their differences: there the cancellation error (~C * 1e-16 of the norms) could reach the distance itself
NEAR_PAIR_FRACTION = 1e-6


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances divided by sqrt(C) (the DPC-kNN scaling): x [B, N, C] -> [B, N, N] float32+.

    From the Gram matrix (one matrix product, ~5x faster on CPU than direct differences at 32 frames x 189
    tokens x 896 channels), in float64 after centring each row's tokens (distances do not change, the
    norms shrink). Pairs so close that |a|^2 + |b|^2 - 2 a.b could cancel below its rounding error
    (squared distance < NEAR_PAIR_FRACTION of the squared norms: near-duplicates, e.g. flat background
    patches) are recomputed from their differences, among the tokens that have such a pair only, so
    duplicates are exactly 0 apart and tiny distances keep their precision, as with direct differences.
    """
    out_dtype = torch.promote_types(x.dtype, torch.float32)
    wide = x.to(torch.float64)
    wide = wide - wide.mean(dim=1, keepdim=True)
    squared = (wide * wide).sum(dim=-1)  # [B, N]
    norms = squared[:, :, None] + squared[:, None, :]  # [B, N, N]
    distances = (norms - 2 * (wide @ wide.transpose(1, 2))).clamp_(min=0)
    near = distances < NEAR_PAIR_FRACTION * norms
    near.diagonal(dim1=1, dim2=2).fill_(False)
    distances.diagonal(dim1=1, dim2=2).zero_()
    for row in near.any(dim=2).any(dim=1).nonzero().flatten().tolist():
        tokens = near[row].any(dim=1).nonzero().flatten()  # [U]: the tokens with a near pair
        block = (tokens[:, None], tokens[None, :])
        exact = torch.cdist(wide[row, tokens], wide[row, tokens], compute_mode="donot_use_mm_for_euclid_dist")
        distances[row][block] = torch.where(near[row][block], exact.square(), distances[row][block])
    return (distances.sqrt_() / math.sqrt(x.shape[-1])).to(out_dtype)


def density_peak_scores(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN cluster-centre scores of every token (Du et al. 2016, as used by HoliTom and FastVID).

    density rho_i = exp(-mean of the squared distances to its k nearest tokens, itself included);
    delta_i = the distance to the nearest denser token (the largest distance of the row's item for the
    densest token); score = rho * delta. Equal densities are ordered by index (the lower index counts as
    denser) instead of the published code's random noise, so the scores are deterministic.

    x [B, N, C], 1 <= k <= N -> (scores [B, N], distances [B, N, N] as `pairwise_distances`).
    """
    batch, tokens, _ = x.shape
    if not 1 <= k <= tokens:
        raise ValueError(f"density peaks need 1 <= k <= {tokens} tokens, got k={k}")
    distances = pairwise_distances(x)
    nearest = torch.topk(distances, k, dim=-1, largest=False).values  # [B, N, k]
    density = torch.exp(-(nearest ** 2).mean(dim=-1))  # [B, N]
    index = torch.arange(tokens, device=x.device)
    # denser[b, i, j]: token j is denser than token i
    denser = (density[:, None, :] > density[:, :, None]) | (
        (density[:, None, :] == density[:, :, None]) & (index[None, None, :] < index[None, :, None]))
    largest = distances.flatten(1).max(dim=1).values[:, None, None].expand_as(distances)
    delta = torch.where(denser, distances, largest).min(dim=-1).values
    return density * delta, distances

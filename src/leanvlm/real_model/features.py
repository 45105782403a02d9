"""On-disk cache of DINOv2 patch features for training (computed once; the vision tower stays frozen).

For every distinct image of a dataset we store the patch tokens (CLS dropped, as
vision_feature_select_strategy="default" does) of several hidden-state layers, so training can try
different `vision_feature_layer` choices without re-running the vision tower:
`<dir>/<name>.npy`: float16 [N_images, len(CACHED_LAYERS), 256, 384] and `<dir>/<name>.json`: the image keys.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from tqdm import tqdm
from transformers import Dinov2Model

from leanvlm.real_model.assemble import NUM_IMAGE_TOKENS, make_image_processor
from leanvlm.real_model.data import VQAItem

# Indices into Dinov2Model's hidden_states (0 = embeddings, 12 = last block, before the final layernorm).
CACHED_LAYERS = (4, 8, 11, 12)


def distinct_images(items: list[VQAItem]) -> tuple[list[str], list]:
    """(keys, images) of the distinct images of `items`, in first-seen order."""
    seen: dict[str, object] = {}
    for item in items:
        seen.setdefault(item.image_key, item.image)
    return list(seen), list(seen.values())


@torch.no_grad()
def cache_features(vision: Dinov2Model, items: list[VQAItem], directory: str, name: str, batch_size: int = 16) -> None:
    """Compute and store the patch features of the distinct images of `items` (skips if already complete)."""
    os.makedirs(directory, exist_ok=True)
    path, index_path = os.path.join(directory, f"{name}.npy"), os.path.join(directory, f"{name}.json")
    if os.path.exists(index_path):
        return
    keys, images = distinct_images(items)
    processor = make_image_processor()
    out = np.lib.format.open_memmap(
        path + ".tmp", mode="w+", dtype=np.float16,
        shape=(len(keys), len(CACHED_LAYERS), NUM_IMAGE_TOKENS, vision.config.hidden_size),
    )
    for start in tqdm(range(0, len(keys), batch_size), desc=f"DINOv2 features {name}"):
        pixels = processor(images[start:start + batch_size], return_tensors="pt").pixel_values
        hidden = vision(pixels, output_hidden_states=True).hidden_states
        out[start:start + len(pixels)] = torch.stack([hidden[l][:, 1:] for l in CACHED_LAYERS], 1).half().numpy()
    out.flush()
    del out
    os.replace(path + ".tmp", path)
    with open(index_path, "w") as f:
        json.dump(keys, f)


def load_features(directory: str, name: str) -> tuple[np.ndarray, dict[str, int]]:
    """(memory-mapped float16 [N, len(CACHED_LAYERS), 256, 384], {image_key: row})."""
    with open(os.path.join(directory, f"{name}.json")) as f:
        keys = json.load(f)
    return np.load(os.path.join(directory, f"{name}.npy"), mmap_mode="r"), {k: i for i, k in enumerate(keys)}


# Hidden states the video model's projector reads (its vision_feature_layer [-9, -1] of 13).
CLIP_LAYERS = (4, 12)


@torch.no_grad()
def cache_clip_features(vision: Dinov2Model, items: list, directory: str, name: str, batch_clips: int = 4,
                        bf16: bool = False) -> None:
    """Store the per-frame patch features of the distinct clips of `items` (ClipItem; skips if complete):
    `<dir>/<name>.npy` float16 [N_clips, frames, 256, 384 * len(CLIP_LAYERS)] (the layers concatenated along
    channels, as the model does) and `<dir>/<name>.json`: the clip keys. `bf16`: run the tower under
    bfloat16 autocast (~3x faster on CPUs with AMX; features within ~1% of float32)."""
    os.makedirs(directory, exist_ok=True)
    path, index_path = os.path.join(directory, f"{name}.npy"), os.path.join(directory, f"{name}.json")
    if os.path.exists(index_path):
        return
    seen: dict[str, tuple] = {}
    for item in items:
        seen.setdefault(item.clip_key, item.frames)
    keys, videos = list(seen), list(seen.values())
    processor = make_image_processor()
    out = np.lib.format.open_memmap(
        path + ".tmp", mode="w+", dtype=np.float16,
        shape=(len(keys), len(videos[0]), NUM_IMAGE_TOKENS, vision.config.hidden_size * len(CLIP_LAYERS)),
    )
    for start in tqdm(range(0, len(keys), batch_clips), desc=f"DINOv2 clip features {name}"):
        chunk = videos[start:start + batch_clips]
        frames = [f for clip in chunk for f in clip]
        # a clip repeats frames (nothing moves while the mover is out of view): run the tower once per
        # distinct frame
        distinct: dict[bytes, int] = {}
        slot = [distinct.setdefault(f.tobytes(), len(distinct)) for f in frames]
        unique = [frames[slot.index(s)] for s in range(len(distinct))]
        pixels = processor(unique, return_tensors="pt").pixel_values
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            hidden = vision(pixels, output_hidden_states=True).hidden_states
        feats = torch.cat([hidden[l][:, 1:].float() for l in CLIP_LAYERS], -1)[slot]  # [clips * frames, 256, 768]
        out[start:start + len(chunk)] = feats.view(len(chunk), -1, *feats.shape[1:]).half().numpy()
    out.flush()
    del out
    os.replace(path + ".tmp", path)
    with open(index_path, "w") as f:
        json.dump(keys, f)

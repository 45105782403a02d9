"""A tiny LLaVA model + a real (tiny) LlavaProcessor saved to a directory, so code that loads with
`from_pretrained` (leanvlm.load, `leanvlm run --model`, the lmms-eval plugin) is tested without downloads."""

from __future__ import annotations

import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlavaProcessor, PreTrainedTokenizerFast
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from tiny import IMAGE_TOKEN, PAD, VOCAB, tiny_llava

WORDS = ["user", "assistant", ":", "?", "what", "color", "is", "the", "shape", "how", "many", "shapes", "are", "there",
         "red", "blue", "green", "circle", "triangle", "rectangle", "yes", "no", "2", "3", "4", "a", "an", "image",
         "describe", "this", "video", "frame", "cat", "dog", "of", "in", "picture", "question", "answer"]

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over VOCAB ids: <pad>=0, <s>=1, </s>=2, <unk>=3, words, filler, <image>=IMAGE_TOKEN."""
    vocab = {"<pad>": PAD, "<s>": 1, "</s>": 2, "<unk>": 3}
    for word in WORDS:
        vocab[word] = len(vocab)
    while len(vocab) < VOCAB:
        vocab[f"w{len(vocab)}"] = len(vocab)
    del vocab[f"w{IMAGE_TOKEN}"]
    vocab["<image>"] = IMAGE_TOKEN
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", additional_special_tokens=["<image>"])
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_processor() -> LlavaProcessor:
    """LlavaProcessor for `tiny.tiny_llava`: 32 px images, patch 8 -> 16 image tokens (CLS dropped)."""
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                         do_center_crop=True)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer(), patch_size=8,
                          vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE, image_token="<image>",
                          num_additional_image_tokens=1)


def save_tiny_vlm(directory: str | os.PathLike[str], layers: int = 6, seed: int = 0) -> str:
    """Save a tiny LLaVA (Llama text model, sdpa) and its processor into `directory`. -> the directory."""
    directory = os.fspath(directory)
    model = tiny_llava("llama", "sdpa", layers=layers, seed=seed)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = PAD
    model.save_pretrained(directory)
    tiny_processor().save_pretrained(directory)
    return directory


def save_tiny_vqa(directory: str | os.PathLike[str], images: int = 3, seed: int = 0) -> str:
    """A VQA directory in easy-VQA's layout: images/N.png (32 px, one coloured square each) and
    questions.json rows [question, answer, N] (two questions per image)."""
    import json

    import numpy as np
    from PIL import Image

    directory = os.fspath(directory)
    os.makedirs(os.path.join(directory, "images"), exist_ok=True)
    rng = np.random.default_rng(seed)
    colors = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    rows = []
    for n in range(images):
        name = list(colors)[n % 3]
        pixels = np.full((32, 32, 3), 240, dtype=np.uint8)
        x, y = rng.integers(0, 16, size=2)
        pixels[y:y + 14, x:x + 14] = colors[name]
        Image.fromarray(pixels).save(os.path.join(directory, "images", f"{n}.png"))
        rows += [["what color is the shape ?", name, n], ["is there a red shape ?", "yes" if name == "red" else "no", n]]
    with open(os.path.join(directory, "questions.json"), "w") as handle:
        json.dump(rows, handle)
    return directory

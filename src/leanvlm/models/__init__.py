"""One adapter per model family; `get_adapter` picks it for a model instance."""

from __future__ import annotations

from torch import nn

from leanvlm.models.base import ModelAdapter
from leanvlm.models.gemma3 import Gemma3Adapter
from leanvlm.models.idefics3 import Idefics3Adapter
from leanvlm.models.internvl import InternVLAdapter
from leanvlm.models.llava import LlavaAdapter
from leanvlm.models.llava_next import LlavaNextAdapter
from leanvlm.models.llava_next_video import LlavaNextVideoAdapter
from leanvlm.models.onevision import OneVisionAdapter
from leanvlm.models.qwen2_vl import QwenVLAdapter
from leanvlm.models.qwen3_vl import Qwen3VLAdapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (LlavaAdapter, OneVisionAdapter, LlavaNextVideoAdapter, QwenVLAdapter,
                                            Qwen3VLAdapter, Idefics3Adapter, LlavaNextAdapter, Gemma3Adapter,
                                            InternVLAdapter)


def supported_models() -> list[str]:
    """Class names of the transformers models leanvlm can apply methods to."""
    return [name for adapter in ADAPTERS for name in adapter.model_classes]


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for this model instance; ValueError listing the supported classes otherwise."""
    name = type(model).__name__
    for adapter in ADAPTERS:
        if name in adapter.model_classes:
            return adapter(model)
    raise ValueError(
        f"leanvlm does not support {name}; supported model classes: {', '.join(supported_models())}"
    )

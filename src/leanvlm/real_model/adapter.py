"""The trained part of the real model: projector weights + LoRA factors of the language model.

Shipped as `weights/adapter.safetensors` (float16) with `weights/recipe.json` (which vision layers the
projector reads, LoRA rank/alpha/targets). At load time the LoRA factors are merged into the frozen
SmolLM2 weights, W <- W + (alpha / r) * B @ A, so the returned model is a plain stock Llava model.
Tensor names: `projector.<name>` for `model.model.multi_modal_projector.<name>` and
`lora.<module path>.A` [r, in] / `lora.<module path>.B` [out, r] for each adapted nn.Linear, and
`image_newline` [hidden] for the OneVision video model.
"""

from __future__ import annotations

import json
import math
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlavaForConditionalGeneration

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")


class LoRALinear(nn.Module):
    """Training-time wrapper: y = base(x) + (alpha / r) * (x @ A^T) @ B^T, with base frozen and B = 0 at start."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / r
        self.A = nn.Parameter(torch.empty(r, base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.A.t() @ self.B.t()) * self.scale


def add_lora(model: LlavaForConditionalGeneration, r: int, alpha: float, targets=LORA_TARGETS) -> dict[str, LoRALinear]:
    """Wrap every target nn.Linear of the language model in a LoRALinear (in place); returns {path: wrapper}."""
    wrapped = {}
    language_model = model.model.language_model
    for name, module in list(language_model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                lora = LoRALinear(child, r, alpha)
                setattr(module, child_name, lora)
                wrapped[f"{name}.{child_name}"] = lora
    return wrapped


def adapter_state(model: LlavaForConditionalGeneration, loras: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    """float16 tensors to ship: projector weights and LoRA factors (see the module docstring for names)."""
    state = {f"projector.{k}": v.detach().half().contiguous() for k, v in model.model.multi_modal_projector.state_dict().items()}
    if hasattr(model.model, "image_newline"):  # OneVision-style models (the video model) train it too
        state["image_newline"] = model.model.image_newline.detach().half().contiguous()
    for path, lora in loras.items():
        state[f"lora.{path}.A"] = lora.A.detach().half().contiguous()
        state[f"lora.{path}.B"] = lora.B.detach().half().contiguous()
    return state


def save_adapter(state: dict[str, torch.Tensor], recipe: dict, directory: str) -> None:
    """Write adapter.safetensors + recipe.json into `directory` (atomic per file)."""
    os.makedirs(directory, exist_ok=True)
    save_file(state, os.path.join(directory, "adapter.safetensors.tmp"))
    os.replace(os.path.join(directory, "adapter.safetensors.tmp"), os.path.join(directory, "adapter.safetensors"))
    with open(os.path.join(directory, "recipe.json"), "w") as f:
        json.dump(recipe, f, indent=2)


def load_recipe(directory: str = WEIGHTS_DIR) -> dict:
    """The recipe.json of a weights directory (vision_feature_layer, lora_r, lora_alpha, ...)."""
    with open(os.path.join(directory, "recipe.json")) as f:
        return json.load(f)


def read_adapter(directory: str = WEIGHTS_DIR) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """A weights directory's adapter as shipped (float16): (projector state dict, {language-model module
    path: (A [r, in], B [out, r])})."""
    state = load_file(os.path.join(directory, "adapter.safetensors"))
    projector = {k[len("projector."):]: v for k, v in state.items() if k.startswith("projector.")}
    factors = {key[len("lora."):-len(".A")]: (state[key], state[key[:-len(".A")] + ".B"])
               for key in state if key.startswith("lora.") and key.endswith(".A")}
    return projector, factors


@torch.no_grad()
def apply_adapter(model: LlavaForConditionalGeneration, directory: str = WEIGHTS_DIR) -> None:
    """Load the projector and merge the LoRA factors into `model`'s language model, in place."""
    recipe = load_recipe(directory)
    projector, factors = read_adapter(directory)
    model.model.multi_modal_projector.load_state_dict(projector)
    newline = load_file(os.path.join(directory, "adapter.safetensors")).get("image_newline")
    if newline is not None:
        model.model.image_newline.copy_(newline.to(model.model.image_newline.dtype))
    scale = recipe["lora_alpha"] / recipe["lora_r"]
    language_model = model.model.language_model
    for path, (a, b) in factors.items():
        linear = language_model.get_submodule(path)
        delta = b.float() @ a.float()  # [out, in]
        linear.weight += (scale * delta).to(linear.weight.dtype)

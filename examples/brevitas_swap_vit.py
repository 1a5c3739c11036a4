"""A float ViT the plugin did not write, made integer-only through Brevitas and exported to QONNX.

``iseg_plugin.nn.quantize`` swaps the model's ops for Brevitas layers (Brevitas' ``QuantLinear`` /
``QuantConv2d`` for the GEMMs, the plugin's layers for everything between them); Brevitas'
``calibration_mode`` calibrates it; ``export_brevitas_qonnx`` writes it through Brevitas' QONNX manager
with the plugin's handlers, and qonnx's own tools read the file as it is.

    .venv/bin/python examples/brevitas_swap_vit.py
"""
from __future__ import annotations

import tempfile
from collections import Counter

import torch
from brevitas.graph.calibrate import calibration_mode
from torch import nn

from iseg_plugin.export.brevitas_qonnx import export_brevitas_qonnx
from iseg_plugin.export.qonnx import qonnx_inference_cost
from iseg_plugin.nn import quantize


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Conv patches, a cls token, a position embedding, two blocks, a mean-pooled linear head."""

    def __init__(self, dim: int = 64, heads: int = 4, classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.Sequential(Block(dim, heads), Block(dim, heads))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))


def main() -> None:
    torch.manual_seed(0)
    model = quantize(TinyViT().eval(), gelu="poly", softmax="bit-exp")
    with torch.no_grad(), calibration_mode(model):  # float ops, the plugin's range rule observes
        for _ in range(4):
            model(torch.randn(8, 3, 32, 32))
    model.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
    print(f"logits: INT{int(out.bit_width)} at scale {float(out.scale):.3g}: {out.int().flatten().tolist()}")
    with tempfile.TemporaryDirectory() as tmp:
        proto = export_brevitas_qonnx(model, (x,), f"{tmp}/tiny_vit.onnx", input_names=["image"],
                                      output_names=["logits"])
        print("QONNX nodes:", dict(Counter(n.op_type for n in proto.graph.node).most_common()))
        cost = qonnx_inference_cost(f"{tmp}/tiny_vit.onnx")
    macs = {k.removeprefix("op_mac_"): int(v) for k, v in cost.items() if k.startswith("op_mac_")}
    print(f"qonnx inference cost: MACs {macs}, {cost['total_bops'] / 1e6:.1f} M bit operations, "
          f"{cost['total_mem_w_bits'] / 8 / 1024:.1f} KiB of weights; no cost rule for {cost['unsupported']}")


if __name__ == "__main__":
    main()

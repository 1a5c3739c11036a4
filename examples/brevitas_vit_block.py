"""An integer-only ViT block built by hand from Brevitas' layers and the plugin's (iseg_plugin.nn).

Brevitas supplies the GEMMs (``QuantLinear``: INT8 weights, ``Int32Bias``) and the input quantizer
(``QuantIdentity``); the plugin supplies every integer operator between them (requantization,
I-LayerNorm, the attention's integer products and softmax, an integer GELU, the residual adds). The block
is calibrated with Brevitas' ``calibration_mode``, then runs on integers, is exported to QONNX through Brevitas'
QONNX manager with the plugin's handlers, and trains (QAT) through the integers.

    .venv/bin/python examples/brevitas_vit_block.py
"""
from __future__ import annotations

import tempfile
from collections import Counter

import torch
from brevitas.graph.calibrate import calibration_mode
from brevitas.nn import QuantIdentity, QuantLinear
from brevitas.quant import Int8WeightPerTensorFloat, Int32Bias
from torch import nn

from iseg_plugin.export.brevitas_qonnx import export_brevitas_qonnx
from iseg_plugin.nn import (DyadicRequant, Int16ActPerTensorFloat, QuantGELU, QuantILayerNorm, QuantMatMul,
                            QuantResidualAdd, QuantSoftmax)


def linear(n_in: int, n_out: int) -> QuantLinear:
    return QuantLinear(n_in, n_out, bias=True, weight_quant=Int8WeightPerTensorFloat, bias_quant=Int32Bias,
                       return_quant_tensor=True)


class IntegerViTBlock(nn.Module):
    """Pre-norm ViT block on an INT16 residual stream: x + attn(norm1(x)), then + mlp(norm2(.))."""

    def __init__(self, dim: int = 64, heads: int = 4, gelu: str = "lambda-shift", softmax: str = "shift"):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = QuantILayerNorm(dim), QuantILayerNorm(dim)
        self.q, self.k, self.v, self.proj = (linear(dim, dim) for _ in range(4))
        self.q_out, self.k_out, self.v_out = DyadicRequant(), DyadicRequant(), DyadicRequant()
        self.scores = QuantMatMul(act_quant=Int16ActPerTensorFloat, alpha=(dim // heads) ** -0.5)  # INT16 logits
        self.softmax = QuantSoftmax(softmax)
        self.context = QuantMatMul()
        self.proj_out = DyadicRequant(Int16ActPerTensorFloat)
        self.add1, self.add2 = QuantResidualAdd(), QuantResidualAdd()
        self.fc1, self.fc2 = linear(dim, 4 * dim), linear(4 * dim, dim)
        self.fc1_out, self.fc2_out = DyadicRequant(), DyadicRequant(Int16ActPerTensorFloat)
        self.act = QuantGELU(gelu)

    def heads_first(self, t):
        b, n, c = t.shape
        return t.reshape(b, n, self.heads, c // self.heads).permute(0, 2, 1, 3)

    def forward(self, x):
        b, n, c = x.shape
        h = self.norm1(x)
        q, k, v = (self.heads_first(out(lin(h))) for lin, out in ((self.q, self.q_out), (self.k, self.k_out),
                                                                  (self.v, self.v_out)))
        p = self.softmax(self.scores(q, k.transpose(-1, -2)))
        context = self.context(p, v).permute(0, 2, 1, 3).reshape(b, n, c)
        x = self.add1(x, self.proj_out(self.proj(context)))
        return self.add2(x, self.fc2_out(self.fc2(self.act(self.fc1_out(self.fc1(self.norm2(x)))))))


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(QuantIdentity(act_quant=Int16ActPerTensorFloat, return_quant_tensor=True),
                          IntegerViTBlock()).double()  # float64: exact INT32 accumulators
    tokens = torch.randn(8, 17, 64, dtype=torch.float64)
    with torch.no_grad(), calibration_mode(model):  # Brevitas' calibration: float ops, statistics observed
        model(tokens)
    model.eval()
    with torch.no_grad():
        out = model(tokens)
    integers = out.int()  # Brevitas' integer view of the IntQuantTensor
    print(f"output: INT{int(out.bit_width)} at scale {float(out.scale):.3g}, integers in "
          f"[{int(integers.min())}, {int(integers.max())}]")
    with tempfile.TemporaryDirectory() as tmp:  # Brevitas' QONNX manager with the plugin's export handlers
        proto = export_brevitas_qonnx(model, (tokens[:1],), f"{tmp}/block.onnx")
    print("QONNX nodes:", dict(Counter(n.op_type for n in proto.graph.node).most_common()))
    model.train()
    loss = model(tokens).value.square().mean()
    loss.backward()
    print(f"QAT: loss {loss.item():.4f}, gradient norm at norm1.weight "
          f"{model[1].norm1.weight.grad.norm():.3g}, at q.weight {model[1].q.weight.grad.norm():.3g}")


if __name__ == "__main__":
    main()

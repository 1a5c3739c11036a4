"""Thin quant layers: Brevitas weight quantizers, integer arithmetic from :mod:`iseg_plugin.intops`.

Every layer takes and returns :class:`QTensor`. In training the integers are float32 tensors
(straight-through gradients); in eval every integer GEMM runs in float64, which holds INT32
accumulators exactly, so the fake-quant model computes the very integers the deployed model does.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from brevitas.nn import QuantConv2d as BrevitasQuantConv2d
from brevitas.nn import QuantLinear as BrevitasQuantLinear
from brevitas.quant import Int8WeightPerChannelFloat
from torch import Tensor, nn

from .. import intops
from .act import QTensor, QuantAct

GELU_VARIANTS = ("lambda-shift", "shift", "poly")
SOFTMAX_VARIANTS = ("shift", "bit-exp")


def _gemm_dtype(module: nn.Module, x: Tensor) -> torch.dtype:
    return x.dtype if module.training else torch.float64


class _IntWeightMixin:
    """INT8 per-output-channel weights from Brevitas' quantizer, INT32 bias at S_in * S_w.

    The integers are Brevitas' own; the gradient reaches the float weight straight through
    (d I_w / d w = 1 / S_w). Scales carry no gradient, as in I-ViT: a near-empty channel's tiny
    scale would otherwise blow the gradient up.
    """

    def int_weight(self) -> tuple[Tensor, Tensor]:
        qw = self.quant_weight()
        scale = qw.scale.detach()
        shape = [-1] + [1] * (self.weight.dim() - 1)
        u = self.weight / scale.reshape(shape)
        return u + (qw.int(float_datatype=True).detach() - u).detach(), scale.reshape(-1)

    def int_bias(self, acc_scale: Tensor) -> Tensor | None:
        return None if self.bias is None else intops.quantize(self.bias, acc_scale, 32)

    def accumulate(self, x: QTensor, op) -> QTensor:
        """``op(x, w, b)`` on the integers (float64 in eval: exact); scale ``S_x * S_w`` per channel."""
        w, w_scale = self.int_weight()
        scale = x.scale * w_scale
        b = self.int_bias(scale)
        dtype = _gemm_dtype(self, x.value)
        return QTensor(op(x.value.to(dtype), w.to(dtype), None if b is None else b.to(dtype)), scale)


class QuantLinear(_IntWeightMixin, BrevitasQuantLinear):
    """Linear with INT8 per-channel weights and INT32 bias; returns the INT32 accumulator."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias, weight_quant=Int8WeightPerChannelFloat)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "QuantLinear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
        layer.load_state_dict(linear.state_dict())
        return layer

    def forward(self, x: QTensor) -> QTensor:
        return self.accumulate(x, F.linear)


class QuantConv2d(_IntWeightMixin, BrevitasQuantConv2d):
    """Patch-embedding conv with INT8 per-channel weights; returns INT32 (B, C, h, w), scale per C."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                         bias=conv.bias is not None, weight_quant=Int8WeightPerChannelFloat)

    @classmethod
    def from_float(cls, conv: nn.Conv2d) -> "QuantConv2d":
        layer = cls(conv)
        layer.load_state_dict(conv.state_dict())
        return layer

    def forward(self, x: QTensor) -> QTensor:
        return self.accumulate(x, lambda v, w, b: F.conv2d(v, w, b, stride=self.stride))


def int_matmul(module: nn.Module, a: QTensor, b_value: Tensor, b_scale: Tensor, extra_scale: float = 1.0) -> QTensor:
    """Integer matmul of two quantized operands (q k^T, attn v, P C^T); a real factor goes to the scale."""
    dtype = _gemm_dtype(module, a.value)
    return QTensor(torch.matmul(a.value.to(dtype), b_value.to(dtype)), a.scale * b_scale * extra_scale)


class QuantLayerNorm(nn.Module):
    """I-LayerNorm followed by its output quantizer (INT8 for the next GEMM, INT16 for the masks)."""

    def __init__(self, norm: nn.LayerNorm, out_bits: int = 8):
        super().__init__()
        self.weight = nn.Parameter(norm.weight.detach().clone())
        self.bias = nn.Parameter(norm.bias.detach().clone())
        self.eps = norm.eps
        self.out = QuantAct(out_bits)

    def forward(self, x: QTensor) -> QTensor:
        params = intops.layernorm_params(self.weight, self.bias)
        z = intops.i_layernorm(x.value, params.weight, params.bias, eps=intops.layernorm_eps(self.eps, float(x.scale)))
        return self.out(QTensor(z, torch.tensor(params.out_scale, dtype=torch.float32)))


class QuantGELU(nn.Module):
    """Integer GELU: lambda-ShiftGELU (default), ShiftGELU or Poly-GELU; output scale S * 2**-7.

    Poly-GELU's (a, b) are fitted on the first batch it sees, then refitted on a reservoir of up to
    100k inputs when a calibration (``set_observing(model, True)`` ... ``False``) ends; they are
    buffers, so they travel with checkpoints.
    """

    RESERVOIR = 100_000

    def __init__(self, variant: str = "lambda-shift", lam: float = intops.LAMBDA_DEFAULT):
        super().__init__()
        if variant not in GELU_VARIANTS:
            raise ValueError(f"GELU variant must be one of {GELU_VARIANTS}, got {variant!r}")
        self.variant = variant
        self.lam = lam
        self.register_buffer("poly_ab", torch.full((2,), math.nan))
        self._reservoir: list[Tensor] = []
        self._calibrating = False

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}" + (f", lambda={self.lam}" if self.variant == "lambda-shift" else "")

    def set_calibrating(self, on: bool) -> None:
        if self._calibrating and not on and self.variant == "poly" and self._reservoir:
            self._fit(torch.cat(self._reservoir))
        self._calibrating, self._reservoir = on, []

    def _fit(self, samples: Tensor) -> None:
        self.poly_ab.copy_(torch.tensor(intops.fit_poly_gelu(samples)))

    def _collect(self, real: Tensor) -> None:
        flat = real.detach().flatten().float()
        if flat.numel() > self.RESERVOIR // 10:
            flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(len(self._reservoir)))
                        [: self.RESERVOIR // 10]]
        self._reservoir.append(flat)
        if torch.isnan(self.poly_ab).any():
            self._fit(flat)

    def forward(self, x: QTensor) -> QTensor:
        s = float(x.scale)
        if self.variant == "lambda-shift":
            y = intops.lambda_shift_gelu(x.value, intops.lambda_shift_gelu_params(s, self.lam))
        elif self.variant == "shift":
            y = intops.shift_gelu(x.value, intops.exp_i0(s))
        else:
            if self._calibrating or torch.isnan(self.poly_ab).any():
                self._collect(x.dequantize())  # the first batch ever seen fits (a, b)
            a, b = self.poly_ab.tolist()
            y = intops.poly_gelu(x.value, intops.poly_gelu_params(a, b, s))
        return QTensor(y, x.scale / 2**7)


class QuantSoftmax(nn.Module):
    """Shiftmax (default) or bit-exp softmax over the last dimension; output scale 2**-(bits-1)."""

    def __init__(self, variant: str = "shift", bits: int = 16):
        super().__init__()
        if variant not in SOFTMAX_VARIANTS:
            raise ValueError(f"softmax variant must be one of {SOFTMAX_VARIANTS}, got {variant!r}")
        self.variant = variant
        self.bits = bits

    def forward(self, x: QTensor) -> QTensor:
        s = float(x.scale)
        if self.variant == "shift":
            p = intops.shiftmax(x.value, intops.exp_i0(s), k_out=self.bits)
        else:
            p = intops.bit_exp_softmax(x.value, intops.bit_exp_params(s), k_out=self.bits)
        return QTensor(p, torch.tensor(2.0 ** -(self.bits - 1)))


def l2_normalize(x: QTensor) -> QTensor:
    """Integer L2 normalisation of the last dimension: unit vectors with scale 2**-15."""
    return QTensor(intops.l2_normalize(x.value), torch.tensor(2.0**-15))


def upsample(x: QTensor, factor: int, mode: str) -> QTensor:
    """Integer nearest or bilinear upsampling of a (B, C, h, w) map; the scale is unchanged."""
    size = (x.value.shape[-2] * factor, x.value.shape[-1] * factor)
    fn = intops.upsample_nearest if mode == "nearest" else intops.upsample_bilinear
    return QTensor(fn(x.value, size), x.scale)

"""Integer-only modules of the deployed Segmenter: integer buffers, integer ops, nothing else.

Every GEMM is an exact int8 x int8 -> int32 product (:func:`int8_matmul`: ``torch._int_mm`` where the
CPU has VNNI, an int32 matmul elsewhere; int64 matmul is ~50x slower); everything else calls
:mod:`iseg_plugin.intops` on integer tensors. The modules are built by :mod:`.convert` from a
calibrated quantized model and hold their constants as integer buffers, so a deployed file is a
state dict of integer tensors plus a small architecture record.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .. import intops
from ..intops import Dyadic

INT8, INT16, INT64 = torch.int8, torch.int16, torch.int64


def int_buffer(module: nn.Module, name: str, value) -> None:
    module.register_buffer(name, torch.as_tensor(value, dtype=INT64) if not isinstance(value, Tensor) else value)


def int8_matmul(a: Tensor, b: Tensor) -> Tensor:
    """Exact (..., M, K) @ (..., K, N) of int8 operands, int32 result: with VNNI one 2-D ``_int_mm``
    per batch entry, written in place (no stacking copy), else an int32 matmul (see INT8_KERNEL).
    Traced for ONNX export, it is one batched ``MatMulInteger`` (see :class:`_Int8MatMul`)."""
    if torch.jit.is_tracing():
        return _Int8MatMul.apply(a, b)
    return _int8_matmul_eager(a, b)


def _cpu_has_vnni() -> bool:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


# torch._int_mm is as fast as an FP32 matmul on CPUs with VNNI; without it (AVX2 only) it falls back
# to a kernel measured ~50x slower than FP32, while a matmul of the int8 values as int32 is exact
# (|sum| <= 128 * 128 * K < 2**31 for K < 2**17) and ~6x slower than FP32. Both give the same integers.
INT8_KERNEL = _cpu_has_vnni()


def _int8_matmul_eager(a: Tensor, b: Tensor) -> Tensor:
    if not INT8_KERNEL:
        return torch.matmul(a.to(torch.int32), b.to(torch.int32))
    batch = a.shape[:-2]
    a2 = a.reshape(-1, a.shape[-2], a.shape[-1])
    b2 = b.reshape(-1, b.shape[-2], b.shape[-1])
    out = torch.empty(a2.shape[0], a2.shape[1], b2.shape[2], dtype=torch.int32)
    for i in range(a2.shape[0]):
        torch._int_mm(a2[i].contiguous(), b2[i].contiguous(), out=out[i])
    return out.reshape(*batch, out.shape[-2], out.shape[-1])


def _shifted_uint8(g, x):
    """An int8 tensor as uint8 ``x + 128`` in an ONNX graph (zero point 128)."""
    from onnx import TensorProto

    wide = g.op("Cast", x, to_i=TensorProto.INT32)
    offset = g.op("Constant", value_t=torch.tensor(128, dtype=torch.int32))
    return g.op("Cast", g.op("Add", wide, offset), to_i=TensorProto.UINT8)


def _uint8_constant(g, value: int):
    return g.op("Constant", value_t=torch.tensor(value, dtype=torch.uint8))


class _Int8MatMul(torch.autograd.Function):
    """The int8 GEMM as one traceable op: ONNX ``MatMulInteger`` on uint8 x uint8. Both operands
    enter shifted by 128 with zero point 128, which MatMulInteger subtracts exactly (weights are
    shifted once, by constant folding). Not uint8 x int8: that kernel is faster on CPUs with
    AVX512-VNNI, but on AVX2 alone onnxruntime computes it with VPMADDUBSW, whose int16 pair sums
    saturate (measured here: off by up to 80291 on a 64x192x96 product); uint8 x uint8 is exact."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        return _int8_matmul_eager(a, b)

    @staticmethod
    def symbolic(g, a, b):
        zero_point = _uint8_constant(g, 128)
        return g.op("MatMulInteger", _shifted_uint8(g, a), _shifted_uint8(g, b), zero_point, zero_point)


def uint16_matmul(p: Tensor, v: Tensor) -> Tensor:
    """Exact ``p @ v`` for p in [0, 2**15] (probabilities) and int8 v, through int8 kernels.

    p = 256 h + l with h in [0, 128], l in [0, 255]; both halves are shifted into int8
    (h - 64, l - 128) and the shifts added back with the column sums of v. Traced for ONNX, the
    halves are uint8 operands of two ``MatMulInteger`` as they are (see :class:`_Uint16MatMul`).
    """
    if torch.jit.is_tracing():
        return _Uint16MatMul.apply(p, v)
    return _uint16_matmul_eager(p, v)


def _uint16_matmul_eager(p: Tensor, v: Tensor) -> Tensor:
    high = torch.bitwise_right_shift(p, 8)
    low = torch.bitwise_and(p, 255)
    colsum = v.to(INT64).sum(-2, keepdim=True)
    hi = int8_matmul((high - 64).to(INT8), v) + 64 * colsum
    lo = int8_matmul((low - 128).to(INT8), v) + 128 * colsum
    return hi * 256 + lo


class _Uint16MatMul(torch.autograd.Function):
    """``uint16_matmul`` as one traceable op: the halves of p, in int32 (p < 2**16), become uint8
    operands of two ``MatMulInteger`` with zero point 0 (no shift, no column sums)."""

    @staticmethod
    def forward(ctx, p: Tensor, v: Tensor) -> Tensor:
        return _uint16_matmul_eager(p, v)

    @staticmethod
    def symbolic(g, p, v):
        from onnx import TensorProto

        def int32(value):
            return g.op("Constant", value_t=torch.tensor(value, dtype=torch.int32))

        p = g.op("Cast", p, to_i=TensorProto.INT32)
        high = g.op("Div", p, int32(256))  # p >= 0: Div's truncation floors
        low = g.op("Sub", p, g.op("Mul", high, int32(256)))
        v, zero, zero_point = _shifted_uint8(g, v), _uint8_constant(g, 0), _uint8_constant(g, 128)

        def times_v(half):
            return g.op("MatMulInteger", g.op("Cast", half, to_i=TensorProto.UINT8), v, zero, zero_point)

        out = g.op("Add", g.op("Mul", times_v(high), int32(256)), times_v(low))
        return g.op("Cast", out, to_i=TensorProto.INT64)


class Requant(nn.Module):
    """Dyadic requantization to a signed ``bits``-wide integer or to asymmetric ``(lo, hi)`` bounds
    (per tensor or per last-dim channel); with ``bits=None`` it only stores a multiplier for an
    operator that takes one."""

    def __init__(self, dyadic: Dyadic, bits: int | tuple[int, int] | None):
        super().__init__()
        self.register_buffer("multiplier", dyadic.multiplier.to(INT64))
        self.register_buffer("shift", dyadic.shift.to(INT64))
        self.bits = bits

    def dyadic(self) -> Dyadic:
        return Dyadic(self.multiplier, self.shift)

    def forward(self, x: Tensor) -> Tensor:
        return intops.requantize(x, self.dyadic(), self.bits)


class IntLinear(nn.Module):
    """INT8 x INT8 -> INT32 accumulator (+ INT32 bias), returned as int64 for requantization.

    An input on an asymmetric grid ``[lo, lo + 255]`` is shifted into int8 by ``input_offset``
    (``lo + 128``); ``W (x - o) + (b + o W 1)`` equals ``W x + b``, so the bias takes the shift back.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, input_offset: int = 0):
        super().__init__()
        if input_offset:
            bias = (0 if bias is None else bias) + input_offset * weight.to(INT64).sum(1)
        self.input_offset = int(input_offset)
        self.register_buffer("weight_t", weight.to(INT8).t().contiguous())  # (in, out)
        self.register_buffer("bias", None if bias is None else bias.to(torch.int32))

    def forward(self, x: Tensor) -> Tensor:
        if self.input_offset:
            x = x - self.input_offset
        flat = x.reshape(-1, x.shape[-1]).to(INT8)
        acc = int8_matmul(flat, self.weight_t).to(INT64)
        if self.bias is not None:
            acc = acc + self.bias
        return acc.reshape(*x.shape[:-1], acc.shape[-1])


class IntAdd(nn.Module):
    def __init__(self, da: Dyadic, db: Dyadic, bits: int = 16):
        super().__init__()
        self.a = Requant(da, bits)
        self.b = Requant(db, bits)
        self.bits = bits

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return intops.requantize_add(a, self.a.dyadic(), b, self.b.dyadic(), self.bits)


class IntLayerNorm(nn.Module):
    """I-LayerNorm fused with its output requantization."""

    def __init__(self, weight: Tensor, bias: Tensor, eps: int, out: Dyadic, out_bits: int):
        super().__init__()
        self.register_buffer("weight", weight.to(INT64))
        self.register_buffer("bias", bias.to(INT64))
        int_buffer(self, "eps", eps)
        self.out = Requant(out, out_bits)

    def forward(self, x: Tensor) -> Tensor:
        return intops.i_layernorm(x, self.weight, self.bias, eps=int(self.eps), out=self.out.dyadic(),
                                  out_bits=self.out.bits)


class IntGELU(nn.Module):
    """lambda-ShiftGELU / ShiftGELU / Poly-GELU with integer constants (output scale S * 2**-7)."""

    def __init__(self, variant: str, consts: dict[str, int], poly: Dyadic | None = None):
        super().__init__()
        self.variant = variant
        for name, value in consts.items():
            int_buffer(self, name, value)
        self.poly = None if poly is None else Requant(poly, None)

    def forward(self, x: Tensor) -> Tensor:
        if self.variant == "lambda-shift":
            params = intops.LambdaGeluParams(int(self.i0), int(self.cap), int(self.frac_bits))
            return intops.lambda_shift_gelu(x, params)
        if self.variant == "shift":
            return intops.shift_gelu(x, int(self.i0))
        params = intops.PolyGeluParams(int(self.clip), int(self.pre_shift), self.poly.dyadic(), int(self.i0))
        return intops.poly_gelu(x, params)


class IntSoftmax(nn.Module):
    def __init__(self, variant: str, bits: int, i0: int | None = None, bit_exp: Dyadic | None = None):
        super().__init__()
        self.variant = variant
        self.bits = bits
        if i0 is not None:
            int_buffer(self, "i0", i0)
        self.bit_exp = None if bit_exp is None else Requant(bit_exp, None)

    def forward(self, x: Tensor) -> Tensor:
        if self.variant == "shift":
            return intops.shiftmax(x, int(self.i0), k_out=self.bits)
        return intops.bit_exp_softmax(x, self.bit_exp.dyadic(), k_out=self.bits)


class IntAttention(nn.Module):
    def __init__(self, num_heads: int, qkv: IntLinear, qkv_act: Requant, scores_act: Requant, softmax: IntSoftmax,
                 context_act: Requant, proj: IntLinear):
        super().__init__()
        if not isinstance(scores_act.bits, int) or scores_act.bits > 16:
            raise ValueError(f"attention scores must be signed integers of at most 16 bits, got {scores_act.bits}")
        self.num_heads = num_heads
        self.qkv, self.qkv_act, self.scores_act = qkv, qkv_act, scores_act
        self.softmax, self.context_act, self.proj = softmax, context_act, proj

    def forward(self, x: Tensor) -> Tensor:
        qkv = self.qkv_act(self.qkv(x)).to(INT8)
        heads = qkv.unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        q, k, v = heads[0], heads[1], heads[2]
        # INT16 as declared (checked above): the softmax reads its exponentials from a table over that range
        scores = self.scores_act(int8_matmul(q, k.transpose(-2, -1))).to(INT16)
        context = uint16_matmul(self.softmax(scores), v)
        context = self.context_act(context.transpose(1, 2).flatten(2))
        return self.proj(context)


class IntMlp(nn.Module):
    def __init__(self, fc1: IntLinear, fc1_act: Requant, act: IntGELU, act_out: Requant, fc2: IntLinear):
        super().__init__()
        self.fc1, self.fc1_act, self.act, self.act_out, self.fc2 = fc1, fc1_act, act, act_out, fc2

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act_out(self.act(self.fc1_act(self.fc1(x)))))


class IntBlock(nn.Module):
    def __init__(self, norm1: IntLayerNorm, attn: IntAttention, add1: IntAdd, norm2: IntLayerNorm, mlp: IntMlp,
                 add2: IntAdd):
        super().__init__()
        self.norm1, self.attn, self.add1, self.norm2, self.mlp, self.add2 = norm1, attn, add1, norm2, mlp, add2

    def forward(self, x: Tensor) -> Tensor:
        x = self.add1(x, self.attn(self.norm1(x))).to(INT16)
        return self.add2(x, self.mlp(self.norm2(x))).to(INT16)

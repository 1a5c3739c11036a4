"""Deployed modules of the operator registry: integer buffers in, integer tensors through.

Each module runs one registry operator with the constants its entry computed at conversion. The same
module also runs on float tensors holding integers (the fake-quant form, for checking and for
straight-through training): GEMMs then accumulate in float64, exact for INT32 results, and every other
step is an :mod:`iseg_plugin.intops` function, which serves both kinds of tensor (one arithmetic).
Built by the trainable lowering (QAT), a module holds its integer weights as float tensors that
hold integers, with straight-through gradients to the float model's parameters (``narrow`` keeps them).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import intops, kernels
from . import gemm as gemm_kernels
from .gemm import INT8, INT64, int8_matmul, uint16_matmul
from ..intops import Dyadic
from ..intops.conv import columns, transposed_as_conv
from ..intops.exp import bit_exp_form, bit_exp_table, row_span, shiftmax_table

INT32 = torch.int32


@dataclass(frozen=True)
class QonnxNode:
    """How a deployed module is written as one node of the QONNX domain ``iseg_plugin.export.qonnx_ops``
    (``docs/qonnx_ops.md``): its op type (None: it appears only as a child of another node), the integer buffers
    and fields written as attributes (read from the module's own constants), its children by name and class (their
    attributes prefixed ``<name>_``), and one line saying what the node computes. Both QONNX exports and qonnx's
    CustomOps are derived from these descriptions."""

    op_type: str | None
    buffers: tuple[str, ...] = ()
    fields: tuple[str, ...] = ()
    children: dict[str, str] = field(default_factory=dict)
    doc: str = ""


def narrow(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Store integers in ``dtype`` (deployment); a float tensor holding integers stays as it is."""
    return x if x.dtype.is_floating_point else x.to(dtype)


def storage_dtype(bounds: tuple[int, int]) -> torch.dtype:
    """The narrowest integer dtype holding ``[lo, hi]``."""
    lo, hi = bounds
    for dtype in (torch.int8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return dtype
    return INT64


def gemm(a: Tensor, b: Tensor) -> Tensor:
    """Exact product of int8 operands: the int8 kernel (int32 accumulator, as int64), or float64 on floats."""
    if a.dtype.is_floating_point:
        return torch.matmul(a.double(), b.double())
    return int8_matmul(a.to(INT8), b.to(INT8)).to(INT64)


class Requant(nn.Module):
    """Dyadic requantization to ``bounds`` (per tensor, or per channel of the last dimension)."""

    QONNX = QonnxNode("DyadicRequant", ("multiplier", "shift"), ("bounds",),
                      doc="`clamp(rq(x, m, e), lo, hi)`")

    def __init__(self, dyadic: Dyadic, bounds: tuple[int, int]):
        super().__init__()
        self.register_buffer("multiplier", dyadic.multiplier.to(INT64))
        self.register_buffer("shift", dyadic.shift.to(INT64))
        self.bounds = (int(bounds[0]), int(bounds[1]))

    @classmethod
    def between(cls, in_scale: Tensor | float, out_scale: float, bounds: tuple[int, int]) -> "Requant":
        ratio = torch.as_tensor(in_scale, dtype=torch.float64) / out_scale
        return cls(intops.dyadic_from_ratio(ratio), bounds)

    def dyadic(self) -> Dyadic:
        return Dyadic(self.multiplier, self.shift)

    def forward(self, x: Tensor) -> Tensor:
        if kernels.use(x):
            return self.fused(x)
        return narrow(intops.requantize(x, self.dyadic(), self.bounds), storage_dtype(self.bounds))

    def fused(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """The fused kernel: ``x`` (+ ``bias``, one per channel of the last dimension) requantized in one pass."""
        return kernels.requantize(x, bias, self.multiplier, self.shift, self.bounds, storage_dtype(self.bounds))


class Multiplier(nn.Module):
    """A dyadic multiplier that an operator takes as a constant (no clamp of its own)."""

    QONNX = QonnxNode(None, ("multiplier", "shift"))

    def __init__(self, dyadic: Dyadic):
        super().__init__()
        self.register_buffer("multiplier", dyadic.multiplier.to(INT64))
        self.register_buffer("shift", dyadic.shift.to(INT64))

    def dyadic(self) -> Dyadic:
        return Dyadic(self.multiplier, self.shift)


class Linear(nn.Module):
    """INT8 x INT8 -> INT32 (+ INT32 bias) over the last dimension, requantized to its output; an input
    on a 256-level asymmetric grid is shifted into int8 by ``input_offset`` first.

    ``weight_bits`` 4: the weights are integers in [-8, 7], held as int8 while the model runs (the int8
    GEMM computes their products exactly: x86 has no 4-bit multiply, and unpacking on every call would
    add a memory pass) and packed two a byte in the deployed file (:mod:`iseg_plugin.deploy.io`)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, out: Requant, input_offset: int = 0,
                 weight_bits: int = 8):
        super().__init__()
        self.register_buffer("weight_t", narrow(weight, INT8).t().contiguous())  # (in, out)
        self.register_buffer("bias", None if bias is None else narrow(bias, INT32))
        self.out = out
        self.input_offset = int(input_offset)  # subtracted from the input (its bias adds it back)
        self.weight_bits = int(weight_bits)

    def blocked(self, x: Tensor) -> bool:
        """Whether the blocked kernel takes ``x``: the GEMM, bias, requantization (and the input's offset) by blocks
        of rows, on the kernels' VNNI or AVX2 GEMM or ``at::_int_mm`` (the GEMM path's)."""
        return (kernels.use(x) and gemm_kernels.gemm_path() in ("int_mm", "vnni", "avx2")
                and x.dtype in (torch.int8, torch.int16) and storage_dtype(self.out.bounds) != INT64)

    def _packed(self) -> tuple:
        """The weights packed for the GEMM path's kernel (VNNI, AVX2; none for ``at::_int_mm``), once per weight tensor
        and path: a cache, not state (the deployed file holds ``weight_t``)."""
        path = gemm_kernels.gemm_path()
        key = (path, self.weight_t.data_ptr(), self.weight_t._version)
        if getattr(self, "_packed_key", None) != key:
            self._packed_weight, self._packed_key = kernels.pack_weight(self.weight_t, path), key
        return self._packed_weight

    def blocked_forward(self, x: Tensor, then: Tensor | None = None) -> Tensor:
        out = kernels.linear(x.reshape(-1, x.shape[-1]), self.weight_t, self.bias, self.out, self.input_offset,
                             storage_dtype(self.out.bounds), then, self._packed())
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def forward(self, x: Tensor) -> Tensor:
        if self.blocked(x):
            return self.blocked_forward(x)
        x2 = x.reshape(-1, x.shape[-1])
        if self.input_offset:
            x2 = x2 - self.input_offset
        if kernels.use(x2):  # the int32 accumulator, its bias and the requantization in one pass
            acc = int8_matmul(x2.to(INT8), self.weight_t).reshape(*x.shape[:-1], self.weight_t.shape[-1])
            return self.out.fused(acc, self.bias)
        acc = gemm(x2, self.weight_t)
        if self.bias is not None:
            acc = acc + self.bias.to(acc.dtype)
        return self.out(acc.reshape(*x.shape[:-1], acc.shape[-1]))


class LinearThen(nn.Module):
    """A Linear whose int8 output only an element-wise module reads (a GELU, sigmoid, clamp...: ``ELEMENTWISE``), as
    the lowering found them in a row. Where the Linear's blocked kernel runs, the element-wise module is computed on
    the 256 int8 values once per call and its value read for each output, in the Linear's pass (the same integers);
    elsewhere the two run one after the other."""

    def __init__(self, linear: Linear, then: nn.Module):
        super().__init__()
        self.linear, self.then = linear, then

    def forward(self, x: Tensor) -> Tensor:
        # (kernels.use first: an export traces the two modules, or the nodes it put in their place)
        if not (kernels.use(x) and self.linear.blocked(x) and storage_dtype(self.linear.out.bounds) == INT8):
            return self.then(self.linear(x))
        return self.linear.blocked_forward(x, self.then(torch.arange(-128, 128, dtype=INT8)))


class PatchConv(nn.Module):
    """A Conv2d whose kernel equals its stride (ViT patch embedding): patches @ weight, one GEMM."""

    def __init__(self, linear: Linear, patch: tuple[int, int]):
        super().__init__()
        self.linear = linear
        self.patch = patch

    def forward(self, x: Tensor) -> Tensor:
        (ph, pw), (b, c, h, w) = self.patch, x.shape
        patches = x.reshape(b, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 1, 3, 5).flatten(3)
        return self.linear(patches).permute(0, 3, 1, 2)


def _conv_gemm(x: Tensor, weight: Tensor, stride, dilation, groups: int) -> Tensor:
    """The accumulators of an int8 convolution of the (already padded) ``x``, one exact int8 GEMM per group
    (:func:`int8_matmul`, int32): the im2col columns of ``x`` (:func:`intops.conv.columns`) @ the weight
    (O, C/G, kh, kw) as (C/G kh kw, O/G); channels last, (N, OH, OW, O), as the fused requantization reads them."""
    o, cg, kh, kw = weight.shape
    cols = columns(x, (kh, kw), stride, (0, 0, 0, 0), dilation)  # (N, C, kh kw, OH, OW)
    n, _, _, oh, ow = cols.shape
    a = cols.reshape(n, groups, cg * kh * kw, oh * ow).permute(1, 0, 3, 2).reshape(groups, n * oh * ow, cg * kh * kw)
    b = weight.reshape(groups, o // groups, cg * kh * kw).transpose(1, 2)
    acc = int8_matmul(a.contiguous(), b.contiguous())  # (G, N OH OW, O/G)
    return acc.transpose(0, 1).reshape(n, oh, ow, o)


class _Conv(nn.Module):
    """What the convolutions share: int8 weights, an INT32 bias and the accumulators requantized per output channel
    (``out``'s channels are the convolution's dim 1: requantized channels last). Exported as standard ONNX (traced:
    pads, slices, MatMulInteger); not a QONNX node of its own (the output's shape is not the input's)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, out: Requant):
        super().__init__()
        self.register_buffer("weight", narrow(weight, INT8))
        self.register_buffer("bias", None if bias is None else narrow(bias, INT32))
        self.out = out

    def _requantize(self, acc: Tensor) -> Tensor:
        """(N, OH, OW, O) accumulators (int32 from the GEMM, or exact float64 holding integers) + bias, requantized,
        as NCHW."""
        if kernels.use(acc):
            return self.out.fused(acc, self.bias).permute(0, 3, 1, 2)
        acc = acc if acc.dtype.is_floating_point else acc.to(INT64)
        if self.bias is not None:
            acc = acc + self.bias.to(acc.dtype)
        return self.out(acc).permute(0, 3, 1, 2)


class Conv2d(_Conv):
    """A Conv2d of any geometry on a symmetric INT8 input, INT8 weights (O, C / groups, kh, kw): ``pads`` (F.pad's
    left, right, top, bottom) with the integer 0, real 0 on that grid (``padding_mode`` reflect / replicate /
    circular: with the input's own integers), then ``intops.conv2d_acc`` on floats holding integers (the fake-quant /
    QAT form), and on int8 tensors the same integers by :func:`_conv_gemm`. ``weight_bits`` 4: INT4 integers held as
    int8 (see :class:`Linear`)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, out: Requant, stride: tuple[int, int],
                 pads: tuple[int, int, int, int], dilation: tuple[int, int], groups: int, padding_mode: str = "zeros",
                 weight_bits: int = 8):
        super().__init__(weight, bias, out)
        self.stride, self.dilation = tuple(int(v) for v in stride), tuple(int(v) for v in dilation)
        self.pads, self.groups, self.padding_mode = tuple(int(v) for v in pads), int(groups), padding_mode
        self.weight_bits = int(weight_bits)

    def forward(self, x: Tensor) -> Tensor:
        if any(self.pads):
            x = F.pad(x, self.pads, mode="constant" if self.padding_mode == "zeros" else self.padding_mode)
        if x.dtype.is_floating_point:
            acc = intops.conv2d_acc(x, self.weight, None, self.stride, 0, self.dilation, self.groups)
            acc = acc.permute(0, 2, 3, 1)
        else:
            acc = _conv_gemm(x.to(INT8), self.weight, self.stride, self.dilation, self.groups)
        return self._requantize(acc)


class ConvTranspose2d(_Conv):
    """A ConvTranspose2d of any geometry on a symmetric INT8 input (the zeros spread between its entries are real 0),
    INT8 weights (C_in, O / groups, kh, kw): ``intops.conv_transpose2d_acc`` on floats holding integers, on int8
    tensors the same integers by :func:`_conv_gemm` of the spread input and the flipped kernel
    (:func:`intops.conv.transposed_as_conv`)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, out: Requant, stride: tuple[int, int],
                 padding: tuple[int, int], output_padding: tuple[int, int], dilation: tuple[int, int], groups: int):
        super().__init__(weight, bias, out)
        self.stride, self.padding = tuple(int(v) for v in stride), tuple(int(v) for v in padding)
        self.output_padding, self.dilation = tuple(int(v) for v in output_padding), tuple(int(v) for v in dilation)
        self.groups = int(groups)

    def forward(self, x: Tensor) -> Tensor:
        geometry = (self.stride, self.padding, self.output_padding, self.groups, self.dilation)
        if x.dtype.is_floating_point:
            acc = intops.conv_transpose2d_acc(x, self.weight, None, *geometry).permute(0, 2, 3, 1)
        else:
            spread, flipped = transposed_as_conv(x.to(INT8), self.weight, *geometry)
            acc = _conv_gemm(spread, flipped, (1, 1), self.dilation, self.groups)
        return self._requantize(acc)


class MatMul(nn.Module):
    """a @ b of two quantized activations; an unsigned 16-bit left operand (softmax probabilities)
    is split into two int8 halves (:func:`uint16_matmul`)."""

    def __init__(self, probabilities: bool, out: Requant):
        super().__init__()
        self.probabilities = probabilities
        self.out = out

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if a.dtype.is_floating_point:
            return self.out(torch.matmul(a.double(), b.double()))
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])  # the int8 kernels take equal batches
        a, b = a.expand(*batch, *a.shape[-2:]), b.expand(*batch, *b.shape[-2:])
        if self.probabilities:
            if kernels.use(a) and self.out.multiplier.dim() == 0 and storage_dtype(self.out.bounds) != INT64:
                return kernels.uint16_matmul_requantize(a, b, self.out.dyadic(), self.out.bounds,
                                                        storage_dtype(self.out.bounds), int8_matmul)
            return self.out(uint16_matmul(a.to(INT64), b.to(INT8)))
        acc = int8_matmul(a.to(INT8), b.to(INT8))
        return self.out(acc if kernels.use(acc) else acc.to(INT64))


class Add(nn.Module):
    """Residual add: each operand requantized to the output scale, summed, clamped (I-ViT's QuantAct)."""

    QONNX = QonnxNode("ResidualAdd", (), ("bits",), {"a": "Multiplier", "b": "Multiplier"},
                      "`clamp(rq(a, ma, ea) + rq(b, mb, eb), -2**(bits-1), 2**(bits-1)-1)`")

    def __init__(self, a: Dyadic, b: Dyadic, bits: int):
        super().__init__()
        self.a, self.b = Multiplier(a), Multiplier(b)
        self.bits = bits

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        bounds = intops.int_range(self.bits)
        if kernels.use(a) and a.shape == b.shape and self.a.multiplier.dim() == 0 and self.b.multiplier.dim() == 0:
            return kernels.requantize_add(a, b, self.a.dyadic(), self.b.dyadic(), bounds, storage_dtype(bounds))
        out = intops.requantize_add(a, self.a.dyadic(), b, self.b.dyadic(), self.bits)
        return narrow(out, storage_dtype(bounds))


class Mul(nn.Module):
    """Product of two quantized tensors (or a tensor and an integer constant), requantized."""

    def __init__(self, out: Requant):
        super().__init__()
        self.out = out

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        wide = (lambda t: t) if a.dtype.is_floating_point else (lambda t: t.to(INT64))
        return self.out(wide(a) * wide(b))


class LayerNorm(nn.Module):
    """I-LayerNorm over the last dimension, fused with its output requantization."""

    QONNX = QonnxNode("ILayerNorm", ("weight", "bias"), ("eps", "norm_bits"), {"out": "Requant"},
                      "I-LayerNorm over the last axis (`norm_bits` fraction bits), then `out`")

    norm_bits = 15  # fraction bits of the normalised value (files written before it was stored hold 15)

    def __init__(self, params: intops.LayerNormParams, eps: int, out: Requant, norm_bits: int = 15):
        super().__init__()
        self.register_buffer("weight", narrow(params.weight, INT64))
        self.register_buffer("bias", narrow(params.bias, INT64))
        self.eps = int(eps)
        self.norm_bits = int(norm_bits)
        self.out = out

    def forward(self, x: Tensor) -> Tensor:
        if kernels.takes(x, self.out.multiplier) and storage_dtype(self.out.bounds) in (torch.int8, torch.int16):
            return kernels.layernorm(x, self.weight, self.bias, self.eps, self.out.dyadic(), self.out.bounds,
                                     storage_dtype(self.out.bounds), self.norm_bits)
        y = intops.i_layernorm(x, self.weight, self.bias, eps=self.eps, out=self.out.dyadic(), out_bits=self.out.bounds,
                               norm_bits=self.norm_bits)
        return narrow(y, storage_dtype(self.out.bounds))


class _SigmoidGELU(nn.Module):
    """The GELUs of I-ViT's form ``x * sigmoid(1.702 x)``: their ShiftExp's width ``k_inter`` and the sigmoid's
    output bits ``k_out`` (output at the input scale times 2**-(k_out - 1)), stored with the model."""

    k_inter, k_out = intops.K_INTER_GELU, 8  # (files written before they were stored hold these)

    def __init__(self):
        super().__init__()
        self.k_inter, self.k_out = intops.K_INTER_GELU, 8  # (instance fields: the deployed file stores them)


class ShiftGELU(_SigmoidGELU):
    """ShiftGELU (I-ViT): output at the input scale times 2**-7, then requantized."""

    QONNX = QonnxNode("ShiftGELU", (), ("i0", "k_inter", "k_out"), {"out": "Requant"},
                      "ShiftGELU (I-ViT) at input scale / 2**(k_out-1), then `out`")

    def __init__(self, i0: int, out: Requant):
        super().__init__()
        self.i0, self.out = int(i0), out

    def forward(self, x: Tensor) -> Tensor:
        if kernels.takes(x, self.out.multiplier) and storage_dtype(self.out.bounds) in (torch.int8, torch.int16):
            return kernels.sigmoid_gelu(x, self.i0, None, 0, self.out.dyadic(), self.out.bounds,
                                        storage_dtype(self.out.bounds), self.k_inter, self.k_out)
        return self.out(intops.shift_gelu(x, self.i0, self.k_inter, self.k_out))


class LambdaShiftGELU(_SigmoidGELU):
    """λ-ShiftGELU (I-Segmenter): ShiftGELU with its sigmoid reference capped at λ."""

    QONNX = QonnxNode("LambdaShiftGELU", (), ("i0", "cap", "frac_bits", "k_inter", "k_out"), {"out": "Requant"},
                      "λ-ShiftGELU (I-Segmenter), then `out`")

    def __init__(self, params: intops.LambdaGeluParams, out: Requant):
        super().__init__()
        self.i0, self.cap, self.frac_bits = int(params.i0), int(params.cap), int(params.frac_bits)
        self.out = out

    def forward(self, x: Tensor) -> Tensor:
        if kernels.takes(x, self.out.multiplier) and storage_dtype(self.out.bounds) in (torch.int8, torch.int16):
            return kernels.sigmoid_gelu(x, self.i0, self.cap, self.frac_bits, self.out.dyadic(), self.out.bounds,
                                        storage_dtype(self.out.bounds), self.k_inter, self.k_out)
        params = intops.LambdaGeluParams(self.i0, self.cap, self.frac_bits)
        return self.out(intops.lambda_shift_gelu(x, params, self.k_inter, self.k_out))


class PolyGELU(nn.Module):
    """Poly-GELU (IPTQ-ViT): the quartic erf fitted on the calibration data."""

    QONNX = QonnxNode("PolyGELU", (), ("clip", "pre_shift", "i0", "k_out"), {"poly": "Multiplier", "out": "Requant"},
                      "Poly-GELU (IPTQ-ViT), then `out`")

    k_out = 8  # output bits of its erf (output at S * 2**-(k_out - 1)); files written before it was stored hold 8
    ELEMENTWISE = True  # (each output integer is a function of its input integer alone: see LinearThen)

    def __init__(self, params: intops.PolyGeluParams, out: Requant, k_out: int = 8):
        super().__init__()
        self.clip, self.pre_shift, self.i0 = int(params.clip), int(params.pre_shift), int(params.i0)
        self.k_out = int(k_out)
        self.poly = Multiplier(params.poly)
        self.out = out

    def forward(self, x: Tensor) -> Tensor:
        params = intops.PolyGeluParams(self.clip, self.pre_shift, self.poly.dyadic(), self.i0)
        if kernels.takes(x, self.poly.multiplier, self.out.multiplier) and storage_dtype(self.out.bounds) in (
                torch.int8, torch.int16):
            return kernels.poly_gelu(x, params, self.out.dyadic(), self.out.bounds, storage_dtype(self.out.bounds),
                                     self.k_out)
        return self.out(intops.poly_gelu(x, params, self.k_out))


def _last_dim(x: Tensor, dim: int) -> bool:
    return dim in (-1, x.dim() - 1)


def _fused_softmax(softmax: nn.Module, x: Tensor) -> Tensor | None:
    """A softmax module's fused kernel over the last dim, where it applies (its table exists); else None."""
    if not (_last_dim(x, softmax.dim) and kernels.use(x)):
        return None
    table = softmax.table(row_span(x))
    return None if table.values is None else kernels.table_softmax(x, table.values, table.low, softmax.bits - 1)


class Shiftmax(nn.Module):
    """Shiftmax (I-ViT): probabilities in [0, 2**(bits-1)] at scale 2**-(bits-1)."""

    QONNX = QonnxNode("Shiftmax", (), ("i0", "bits", "dim"), doc="probabilities in [0, 2**(bits-1)] along `dim`")

    def __init__(self, i0: int, bits: int, dim: int):
        super().__init__()
        self.i0, self.bits, self.dim = int(i0), int(bits), int(dim)

    def table(self, span: int | None):
        """The exponential table the fused kernels read for inputs whose rows span at most ``span``."""
        return shiftmax_table(self.i0, span)

    def kernel_exp(self, span: int | None):
        """The exponential as the fused attention computes it (its table), None where there is no table."""
        table = self.table(span)
        return table if table.values is not None else None

    def forward(self, x: Tensor) -> Tensor:
        fused = _fused_softmax(self, x)
        if fused is not None:
            return fused
        return narrow(intops.shiftmax(x, self.i0, k_out=self.bits, dim=self.dim), INT32)


class BitExpSoftmax(nn.Module):
    """Bit-exp softmax (IPTQ-ViT, our reading): probabilities as Shiftmax's."""

    QONNX = QonnxNode("BitExpSoftmax", (), ("bits", "dim"), {"exponent": "Multiplier"},
                      "probabilities in [0, 2**(bits-1)] along `dim`")

    def __init__(self, params: Dyadic, bits: int, dim: int):
        super().__init__()
        self.exponent = Multiplier(params)
        self.bits, self.dim = int(bits), int(dim)

    def table(self, span: int | None):
        """The exponential table the fused kernels read (see :meth:`Shiftmax.table`)."""
        return bit_exp_table(self.exponent.dyadic(), span)

    def kernel_exp(self, span: int | None):
        """The exponential as the fused attention computes it: element by element
        (:class:`~iseg_plugin.intops.exp.BitExpForm`) where its exponent's dyadic is in the kernel's int32 range (a
        multiplier below 2**31, a shift below 63), else read from its table (None where there is none)."""
        form = bit_exp_form(self.exponent.dyadic())
        if 0 <= form.multiplier < 2**31 and 0 <= form.shift < 63:
            return form
        table = self.table(span)
        return table if table.values is not None else None

    def forward(self, x: Tensor) -> Tensor:
        fused = _fused_softmax(self, x)
        if fused is not None:
            return fused
        return narrow(intops.bit_exp_softmax(x, self.exponent.dyadic(), k_out=self.bits, dim=self.dim), INT32)


class L2Norm(nn.Module):
    """Integer L2 normalisation over the last dimension: scale 2**-frac_bits, then requantized."""

    QONNX = QonnxNode("IntL2Norm", (), ("frac_bits",), {"out": "Requant"},
                      "`x / sqrt(sum(x * x))` over the last axis at 2**-frac_bits, then `out`")

    def __init__(self, frac_bits: int, out: Requant):
        super().__init__()
        self.frac_bits, self.out = int(frac_bits), out

    def forward(self, x: Tensor) -> Tensor:
        return self.out(intops.l2_normalize(x, self.frac_bits))


class Upsample(nn.Module):
    """Nearest or integer bilinear resize of (B, C, H, W) integers to ``size`` (scale unchanged); bilinear with
    ``align_corners`` 0 or 1 (F.interpolate's)."""

    QONNX = QonnxNode("IntResize", (), ("mode", "size", "align_corners"),
                      doc="the last two axes resized to `size` (mode 0 nearest, 1 bilinear), values on the input's grid")
    align_corners = 0  # (files written before it was stored hold 0)

    def __init__(self, mode: str, size: tuple[int, int], out: Requant | None, align_corners: bool = False):
        super().__init__()
        self.mode, self.size, self.out = mode, (int(size[0]), int(size[1])), out
        self.align_corners = int(bool(align_corners))

    def forward(self, x: Tensor) -> Tensor:
        corners = bool(self.align_corners)
        if self.out is None and x.dtype in (torch.int8, torch.int16, torch.int32) and kernels.use(x):
            return kernels.upsample(x, self.mode, self.size, corners)
        y = intops.upsample_nearest(x, self.size) if self.mode == "nearest" else \
            intops.upsample_bilinear(x, self.size, corners)
        return narrow(y, x.dtype) if self.out is None else self.out(y)  # (values stay within the input's range)


class Clamp(nn.Module):
    """Integers clamped to ``bounds`` on their own grid: ReLU, ReLU6, hardtanh and clamp, their float bounds
    rounded onto the input's grid (the float op's output, quantized on that grid, is this)."""

    QONNX = QonnxNode("IntClamp", (), ("bounds",), doc="`clamp(x, lo, hi)` on the input's grid")
    ELEMENTWISE = True

    def __init__(self, bounds: tuple[int, int]):
        super().__init__()
        self.bounds = (int(bounds[0]), int(bounds[1]))

    def forward(self, x: Tensor) -> Tensor:
        return narrow(intops.int_clamp(x, *self.bounds), x.dtype)


class Sigmoid(nn.Module):
    """Integer sigmoid of ``alpha x`` (the bit-exp exponential, one division): output in [0, 2**(k_out-1)] at
    scale 2**-(k_out-1), then requantized to ``out``."""

    QONNX = QonnxNode("IntSigmoid", (), ("k_out", "k_inter"), {"exponent": "Multiplier", "out": "Requant"},
                      "sigmoid of `x * exponent / (2**12 log2 e)` at 2**-(k_out-1) (`intops.sigmoid`), then `out`")
    ELEMENTWISE = True

    def __init__(self, params: intops.SigmoidParams, k_out: int, k_inter: int, out: Requant):
        super().__init__()
        self.exponent = Multiplier(params.exponent)
        self.k_out, self.k_inter, self.out = int(k_out), int(k_inter), out

    def forward(self, x: Tensor) -> Tensor:
        params = intops.sigmoid_params_from(self.exponent.dyadic(), x)
        return self.out(intops.sigmoid(x, params, self.k_out, self.k_inter))


class XSigmoid(Sigmoid):
    """``x * sigmoid(alpha x)`` (SiLU: alpha 1; quick-GELU: 1.702): output at ``S * 2**-(k_out-1)``, requantized."""

    QONNX = QonnxNode("IntXSigmoid", (), ("k_out", "k_inter"), {"exponent": "Multiplier", "out": "Requant"},
                      "`x * IntSigmoid(x)` at S * 2**-(k_out-1) (`intops.x_sigmoid`), then `out`")

    def forward(self, x: Tensor) -> Tensor:
        params = intops.sigmoid_params_from(self.exponent.dyadic(), x)
        return self.out(intops.x_sigmoid(x, params, self.k_out, self.k_inter))


class HardSigmoid(nn.Module):
    """Hardsigmoid ``relu6(x S + 3) / 6`` by one dyadic multiply (``swish``: times x, hardswish), requantized."""

    QONNX = QonnxNode("IntHardSigmoid", (), ("k_out", "swish"), {"slope": "Multiplier", "out": "Requant"},
                      "`h = clamp(rq(x, slope) + 2**(k_out-2), 0, 2**(k_out-1))` (`swish`: `x * h`), then `out`")
    ELEMENTWISE = True

    def __init__(self, params: intops.HardParams, swish: bool, out: Requant):
        super().__init__()
        self.slope = Multiplier(params.slope)
        self.k_out, self.swish, self.out = int(params.k_out), int(swish), out

    def forward(self, x: Tensor) -> Tensor:
        params = intops.hard_params_from(self.slope.dyadic(), self.k_out, x)
        return self.out((intops.hardswish if self.swish else intops.hardsigmoid)(x, params))


class _Pool(nn.Module):
    """A pool of the last ``len(sizes)`` dims: one static window table per axis (``index0``, ``index1``, ...;
    :func:`intops.pool_windows`), built for the input's sizes at conversion."""

    def _tables(self, axes) -> None:
        for i, a in enumerate(axes):
            self.register_buffer(f"index{i}", a.index.to(INT64))
        self.sizes = [int(a.size) for a in axes]

    def axes(self) -> tuple:
        return intops.pool_axes([getattr(self, f"index{i}") for i in range(len(self.sizes))], self.sizes)


class AvgPool(_Pool):
    """Average (or adaptive average) pooling: window sums, one dyadic multiplier per output position (its window's
    count in it), clamped to ``bounds``."""

    def __init__(self, params: intops.AvgPoolParams, bounds: tuple[int, int]):
        super().__init__()
        self._tables(params.axes)
        self.out = Multiplier(params.requant)
        self.bounds = (int(bounds[0]), int(bounds[1]))

    def forward(self, x: Tensor) -> Tensor:
        params = intops.avg_pool_params_from(self.axes(), self.out.dyadic(), x)
        return narrow(intops.avg_pool(x, params, self.bounds), storage_dtype(self.bounds))


class MaxPool(_Pool):
    """Max (or adaptive max) pooling: exact, on the input's grid."""

    def __init__(self, axes: tuple):
        super().__init__()
        self._tables(axes)

    def forward(self, x: Tensor) -> Tensor:
        return narrow(intops.max_pool(x, self.axes()), x.dtype)


class Mean(nn.Module):
    """Mean over ``dim``: an int64 sum, then one requantization by S_in / (n S_out)."""

    def __init__(self, dim, keepdim: bool, out: Requant):
        super().__init__()
        self.dim, self.keepdim, self.out = dim, keepdim, out

    def forward(self, x: Tensor) -> Tensor:
        wide = x if x.dtype.is_floating_point else x.to(INT64)
        return self.out(wide.sum(self.dim, keepdim=self.keepdim))


class Cat(nn.Module):
    """Concatenation at one scale: each input requantized to it first (None: already there)."""

    def __init__(self, dim: int, requants: list[Requant | None], dtype: torch.dtype):
        super().__init__()
        self.dim = dim
        self.requants = nn.ModuleList([nn.Identity() if r is None else r for r in requants])
        self.dtype = dtype

    def forward(self, *parts: Tensor) -> Tensor:
        return torch.cat([narrow(r(p), self.dtype) for r, p in zip(self.requants, parts)], self.dim)


class Attention(nn.Module):
    """``context(softmax(scores(q, kt)), v)``: three registry modules that the lowering found in a row
    (matmul -> softmax over the last dim -> probabilities matmul), run as one fused kernel by blocks of
    query rows where the kernels apply (the same integers), else one after the other."""

    def __init__(self, scores: MatMul, softmax: nn.Module, context: MatMul):
        super().__init__()
        self.scores, self.softmax, self.context = scores, softmax, context

    def _fused_exp(self, q: Tensor, kt: Tensor, v: Tensor):
        """The softmax's exponential (``kernel_exp``) if the fused kernel takes these operands, else None."""
        # (its GEMMs are at::_int_mm or the AVX2 kernel: on the int32-matmul path the three modules run, each fused)
        if not (gemm_kernels.gemm_path() != "int32" and kernels.use(q) and q.dim() >= 3 and q.shape[:-2] == kt.shape[:-2] == v.shape[:-2]
                and self.scores.out.multiplier.dim() == 0 and self.context.out.multiplier.dim() == 0
                and storage_dtype(self.context.out.bounds) in (torch.int8, torch.int16)
                and _last_dim(q, self.softmax.dim) and self.softmax.bits == 16):
            return None
        return self.softmax.kernel_exp(row_span(torch.empty(0, dtype=storage_dtype(self.scores.out.bounds))))

    def forward(self, q: Tensor, kt: Tensor, v: Tensor) -> Tensor:
        exp = self._fused_exp(q, kt, v)
        if exp is None:
            return self.context(self.softmax(self.scores(q, kt)), v)
        return kernels.attention(q.to(INT8), kt.to(INT8), v.to(INT8), self.scores.out, exp, self.context.out,
                                 storage_dtype(self.context.out.bounds), self.softmax.bits - 1,
                                 gemm_kernels.gemm_path())


class AsIntegers(nn.Module):
    """The trainable form's input in the deployed model's integer dtype (float64 holding integers converted,
    exactly): the values computed from frozen constants alone then run on the integer kernels."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, x: Tensor) -> Tensor:
        return x.to(self.dtype)


class PixelsToInt8(nn.Module):
    """uint8 RGB pixels (B, 3, H, W) -> INT8 input integers, mean and std folded into one dyadic
    multiplier per channel (:func:`iseg_plugin.intops.pixels_to_int8`)."""

    def __init__(self, mean_fixed: Tensor, multiplier: Dyadic):
        super().__init__()
        self.register_buffer("mean_fixed", mean_fixed.to(INT64))
        self.pixel = Requant(multiplier, (-128, 127))

    def forward(self, pixels: Tensor) -> Tensor:
        if not pixels.dtype.is_floating_point and pixels.dtype != torch.uint8:
            raise TypeError(f"this integer model takes uint8 RGB pixels, got {pixels.dtype}")
        if kernels.use(pixels) and pixels.dim() == 4:
            return kernels.pixels_to_int8(pixels, self.mean_fixed, self.pixel.dyadic())
        return narrow(intops.pixels_to_int8(pixels, self.mean_fixed, self.pixel.dyadic()), INT8)

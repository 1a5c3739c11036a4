"""Exact integer GEMM kernels of the deployed modules, with their ONNX lowerings.

Every GEMM is an exact int8 x int8 -> int32 product (:func:`int8_matmul`, on the fastest path of this CPU:
see :func:`gemm_path`; int64 matmul is ~50x slower). Softmax probabilities (up to 2**15) enter
:func:`uint16_matmul` as two int8 halves.
Traced for ONNX, they are ``MatMulInteger`` nodes (uint8 x uint8 or uint8 x int8) or int32 ``MatMul``s
(see :func:`onnx_gemm`).
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch
from torch import Tensor

from .. import kernels
from ..kernels.cpu import cpu_flags, cpu_has_vnni, cpu_isa  # noqa: F401 - cpu_isa: printed by benchmarks

INT8, INT64 = torch.int8, torch.int64


def int8_matmul(a: Tensor, b: Tensor) -> Tensor:
    """Exact (..., M, K) @ (..., K, N) of int8 operands (equal batch shapes), int32 result, on
    :func:`gemm_path`'s kernel. Traced for ONNX export, it is one batched ``MatMulInteger`` (see
    :class:`_Int8MatMul`)."""
    if torch.jit.is_tracing():
        return _Int8MatMul.apply(a, b)
    return _int8_matmul_eager(a, b)


# The exact int8 GEMMs, fastest first where the CPU has them (gemm_path picks one at run time):
# "vnni": "int_mm" with the fused attention's products on the kernels' own AVX-512 VNNI GEMM (keys and values
#   packed once per head, where _int_mm packs them again for every block of query rows); needs AVX-512 VNNI and
#   the kernels built.
# "int_mm": torch._int_mm, oneDNN's VNNI kernel, several times faster than FP32; without VNNI it falls back to
#   a naive loop ~50x slower than FP32, so it is used only with VNNI.
# "avx2": the kernels' own (iseg_plugin/kernels, int16 pairs by vpmaddwd, on torch's threads); the deployed ViT-S /
#   ViT-B on it run 1.3x / 1.4x faster than FP32 onnxruntime (kernels built for AVX2 on a Zen 4 CPU:
#   docs/avx2_level/performance.md); needs the kernels built.
# "int32": a matmul of the int8 values as int32 (|sum| <= 128 * 128 * K < 2**31 for K < 2**17), ~6x slower
#   than FP32, on every CPU. All three give the same integers (tests/test_gemm_kernels.py).
GEMM_PATHS = ("vnni", "int_mm", "avx2", "int32")
GEMM: str | None = None  # a path forced (tests, benchmarks); None: the fastest this CPU has
NEEDS = {"vnni": "avx512_vnni", "avx2": "avx2"}  # the CPU flag a path needs to run (int_mm and int32 run on every CPU)


@functools.lru_cache(maxsize=None)
def available_gemm_paths() -> tuple[str, ...]:
    """The GEMM paths this CPU runs fast and exactly, fastest first ("int32" always); found once per process."""
    return tuple(path for path, here in (("vnni", "avx512_vnni" in cpu_flags() and kernels.enabled()),
                                         ("int_mm", cpu_has_vnni()),
                                         ("avx2", "avx2" in cpu_flags() and kernels.enabled()), ("int32", True)) if here)


def runnable_gemm_paths() -> tuple[str, ...]:
    """Every GEMM path this machine computes exactly when forced through :data:`GEMM` (the tests run each): the
    available ones and ``int_mm`` also without VNNI, where torch's naive loop is exact but ~50x slower than FP32."""
    return tuple(path for path in GEMM_PATHS if path == "int_mm" or path in available_gemm_paths())


def gemm_path() -> str:
    """The GEMM path the deployed modules take: :data:`GEMM` if set, else the fastest available."""
    return GEMM or available_gemm_paths()[0]


@contextlib.contextmanager
def forced(path: str):
    """Take the GEMM path ``path`` (one of :func:`runnable_gemm_paths`) inside this block (tests, benchmarks)."""
    global GEMM
    if path not in runnable_gemm_paths():
        raise ValueError(f"GEMM path {path!r} does not run here; this CPU runs: {', '.join(runnable_gemm_paths())}")
    before, GEMM = GEMM, path
    try:
        yield
    finally:
        GEMM = before


# The ONNX form of the GEMMs, for one export (see onnx_gemm): "u8u8" runs exactly on every CPU; "u8s8"
# (the int8 operand as it is) is onnxruntime's faster kernel, exact only with AVX-512 VNNI: its vpdpbusd
# accumulates u8 x s8 products in int32, where the AVX2 kernel's vpmaddubsw saturates int16 pair sums
# (measured here: off by up to 80291 on a 64x192x96 product). AVX-VNNI alone is not trusted: untested.
# "i32": MatMul of the operands cast to int32 (exact, slow in onnxruntime): the QONNX export's, whose MatMuls
# qonnx's tools understand (inference cost) where they do not know MatMulInteger.
ONNX_GEMMS = ("u8u8", "u8s8", "i32")
_onnx_gemm = "u8u8"


def onnx_gemm_for_this_cpu() -> str:
    """The fastest exact ONNX GEMM form for onnxruntime on this CPU."""
    return "u8s8" if "avx512_vnni" in cpu_flags() else "u8u8"


@contextlib.contextmanager
def onnx_gemm(kind: str):
    """Trace the GEMMs in the ONNX form ``kind`` (see ONNX_GEMMS) for the duration of one export."""
    global _onnx_gemm
    if kind not in ONNX_GEMMS:
        raise ValueError(f"unknown ONNX GEMM form {kind!r}; known: {', '.join(ONNX_GEMMS)}")
    before, _onnx_gemm = _onnx_gemm, kind
    try:
        yield
    finally:
        _onnx_gemm = before


def _int8_matmul_eager(a: Tensor, b: Tensor, path: str | None = None) -> Tensor:
    path = path or gemm_path()
    if path == "int32":
        return torch.matmul(a.to(torch.int32), b.to(torch.int32))
    batch = a.shape[:-2]
    a3 = a.reshape(math.prod(batch), a.shape[-2], a.shape[-1])
    b3 = b.reshape(math.prod(b.shape[:-2]), b.shape[-2], b.shape[-1])
    if path == "avx2":
        out = torch.ops.iseg_kernels.int8_mm_avx2(a3, b3)
    else:  # int_mm, vnni: one 2-D _int_mm per batch entry, written in place (no stacking copy)
        out = torch.empty(a3.shape[0], a3.shape[1], b3.shape[2], dtype=torch.int32)
        for i in range(a3.shape[0]):
            torch._int_mm(a3[i].contiguous(), b3[i].contiguous(), out=out[i])
    return out.reshape(*batch, out.shape[-2], out.shape[-1])


def _shifted_uint8(g, x):
    """An int8 tensor as uint8 ``x + 128`` in an ONNX graph (zero point 128)."""
    from onnx import TensorProto

    wide = g.op("Cast", x, to_i=TensorProto.INT32)
    offset = g.op("Constant", value_t=torch.tensor(128, dtype=torch.int32))
    return g.op("Cast", g.op("Add", wide, offset), to_i=TensorProto.UINT8)


def _uint8_constant(g, value: int):
    return g.op("Constant", value_t=torch.tensor(value, dtype=torch.uint8))


def _int32_matmul(g, a, b):
    from onnx import TensorProto

    return g.op("MatMul", g.op("Cast", a, to_i=TensorProto.INT32), g.op("Cast", b, to_i=TensorProto.INT32))


def _right_operand(g, b):
    """A GEMM's int8 right operand and its zero point, in the form of this export (see ONNX_GEMMS)."""
    if _onnx_gemm == "u8s8":
        return b, g.op("Constant", value_t=torch.tensor(0, dtype=torch.int8))
    return _shifted_uint8(g, b), _uint8_constant(g, 128)


class _Int8MatMul(torch.autograd.Function):
    """The int8 GEMM as one traceable op: ONNX ``MatMulInteger``. The left operand enters shifted by
    128 as uint8 with zero point 128, which MatMulInteger subtracts exactly; the right one likewise
    ("u8u8"; weights are shifted once, by constant folding) or as the int8 it is ("u8s8")."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        # Traced for export, the graph is the symbolic's whatever this CPU's path is: the value is computed by the
        # int32 matmul, which traces as plain aten ops (a traced custom op or per-batch _int_mm with out= broke
        # the exporter's peephole pass).
        return _int8_matmul_eager(a, b, "int32")

    @staticmethod
    def symbolic(g, a, b):
        if _onnx_gemm == "i32":
            return _int32_matmul(g, a, b)
        right, right_zero_point = _right_operand(g, b)
        return g.op("MatMulInteger", _shifted_uint8(g, a), right, _uint8_constant(g, 128), right_zero_point)


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
    operands of two ``MatMulInteger`` with zero point 0 (no shift, no column sums); v as in :class:`_Int8MatMul`."""

    @staticmethod
    def forward(ctx, p: Tensor, v: Tensor) -> Tensor:
        return _uint16_matmul_eager(p, v)

    @staticmethod
    def symbolic(g, p, v):
        from onnx import TensorProto

        def int32(value):
            return g.op("Constant", value_t=torch.tensor(value, dtype=torch.int32))

        if _onnx_gemm == "i32":  # (|p @ v| <= 2**15 * 128 for probability rows summing to 2**15: no overflow)
            return g.op("Cast", _int32_matmul(g, p, v), to_i=TensorProto.INT64)

        p = g.op("Cast", p, to_i=TensorProto.INT32)
        high = g.op("Div", p, int32(256))  # p >= 0: Div's truncation floors
        low = g.op("Sub", p, g.op("Mul", high, int32(256)))
        (v, zero_point), zero = _right_operand(g, v), _uint8_constant(g, 0)

        def times_v(half):
            return g.op("MatMulInteger", g.op("Cast", half, to_i=TensorProto.UINT8), v, zero, zero_point)

        out = g.op("Add", g.op("Mul", times_v(high), int32(256)), times_v(low))
        return g.op("Cast", out, to_i=TensorProto.INT64)

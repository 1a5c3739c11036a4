"""Fused integer kernels (C++, ``torch.library`` ops ``torch.ops.iseg_kernels.*``) for the deployed modules.

The intops reference makes one int64 pass over memory per integer step; each kernel here does an
operator's steps in one pass, in integer types only, and returns what the intops functions return
(tests compare them to the bit). Built on first use with torch's C++ extension tooling (ninja, the
system C++ compiler, torch's headers) for this CPU (``-march=native``, or a lower level forced by
``ISEG_KERNELS_ISA``: :mod:`.cpu`; cached per source, flags and ISA),
and used by the deployed modules on integer tensors (not on the fake-quant / QAT float path, and not
while an ONNX export traces the model: the exported graph is the intops one).

``ISEG_KERNELS=intops`` in the environment selects the intops reference path everywhere. Loading the kernels
also lets glibc's malloc keep freed memory for reuse (:func:`_keep_freed_memory`; ``ISEG_MALLOC=system``: not).
If the build fails (no compiler), the reference path runs and :func:`describe` says why.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from pathlib import Path

import torch

from ..intops.exp import BitExpForm
from .cpu import cpu_isa, isa_compile_flags

SOURCE = Path(__file__).with_name("fused.cpp")


@functools.lru_cache(maxsize=None)
def _build() -> str | None:
    """Build and load the extension once per process; the reason it is unavailable otherwise."""
    if os.environ.get("ISEG_KERNELS", "fused") == "intops":
        return "ISEG_KERNELS=intops"
    from torch.utils import cpp_extension

    # -fopenmp: at::parallel_for in the kernels runs on torch's own OpenMP threads (the extension resolves libgomp to
    # the copy torch has loaded: one pool, no second set of spinning workers; docs/architecture.md)
    flags = ["-O3", "-march=native", *isa_compile_flags(), "-fopenmp"]
    # (the source's path is in the key: checkouts side by side each keep their own build instead of rebuilding
    # one shared build directory in turn)
    key = SOURCE.read_bytes() + " ".join([str(SOURCE), cpu_isa(), torch.__version__, *flags]).encode()
    try:
        cpp_extension.load(name=f"iseg_kernels_{hashlib.sha256(key).hexdigest()[:12]}", sources=[str(SOURCE)],
                           is_python_module=False, extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as err:  # noqa: BLE001 - any build failure means: run the reference path, and say why
        return f"the C++ kernels did not build ({type(err).__name__}: {str(err).strip().splitlines()[-1][:200]})"
    _keep_freed_memory()
    return None


def _keep_freed_memory() -> None:
    """Let glibc's malloc keep freed memory for the next allocation instead of returning it to the system.

    torch's CPU allocator has no cache: each module's output is a fresh malloc, and by default glibc serves blocks
    above its (adaptive) mmap threshold with mmap and unmaps them on free, so every forward faults in and zeroes
    its activations again (ViT-S 512x512: ~9 % of one thread's time in the kernel's page-fault and clear_page
    code; process CPU time per forward 0.51-0.54 s -> 0.44-0.49 s with the two settings below, measured
    interleaved). Blocks up to 256 MiB then come from the heap, which is trimmed only beyond 1 GiB free at its top
    (the model's peak activations stay mapped, as a caching allocator would keep them). Process-wide and glibc only;
    ``ISEG_MALLOC=system`` in the environment leaves malloc as it is."""
    if os.environ.get("ISEG_MALLOC", "") == "system":
        return
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    mallopt(m_mmap_threshold, 256 << 20)
    mallopt(m_trim_threshold, 1 << 30)


def enabled() -> bool:
    return _build() is None


_reference = False  # set by reference(): the intops path for a while (benchmarks, tests)


def use(x: torch.Tensor) -> bool:
    """Whether a deployed module takes the fused kernel for ``x``: integers, eager, kernels built."""
    return not x.dtype.is_floating_point and not torch.jit.is_tracing() and not _reference and enabled()


@contextlib.contextmanager
def reference():
    """Run the intops reference path inside this block (to compare or time the two)."""
    global _reference
    before, _reference = _reference, True
    try:
        yield
    finally:
        _reference = before


def describe() -> str:
    """Which kernels run here (for benchmarks and the CLI)."""
    why = _build()
    return f"fused C++ kernels ({cpu_isa()})" if why is None else f"intops reference ({why})"


def requantize(x, bias, multiplier, shift, bounds, out_dtype):
    return torch.ops.iseg_kernels.requantize(x, bias, multiplier, shift, int(bounds[0]), int(bounds[1]), out_dtype)


def requantize_add(a, b, da, db, bounds, out_dtype):
    return torch.ops.iseg_kernels.requantize_add(a, b, int(da.multiplier), int(da.shift), int(db.multiplier),
                                         int(db.shift), int(bounds[0]), int(bounds[1]), out_dtype)


def table_softmax(x, table, low: int, out_frac_bits: int):
    return torch.ops.iseg_kernels.table_softmax(x, table, int(low), int(out_frac_bits))


def layernorm(x, weight, bias, eps: int, out_dyadic, bounds, out_dtype, norm_bits: int):
    return torch.ops.iseg_kernels.layernorm(x, weight, bias, int(eps), int(out_dyadic.multiplier), int(out_dyadic.shift),
                                            int(bounds[0]), int(bounds[1]), int(norm_bits), out_dtype)


def poly_gelu(x, params, out_dyadic, bounds, out_dtype, k_out: int):
    return torch.ops.iseg_kernels.poly_gelu(x, int(params.clip), int(params.pre_shift), int(params.poly.multiplier),
                                            int(params.poly.shift), int(k_out), int(out_dyadic.multiplier),
                                            int(out_dyadic.shift), int(bounds[0]), int(bounds[1]), out_dtype)


def linear(x, weight_t, bias, out, input_offset: int, out_dtype, then=None, packed=()):
    """``out(int8(x - input_offset) @ weight_t + bias)`` of (M, K) int8 / int16 ``x``, by blocks of rows (the module
    :class:`~iseg_plugin.ops.modules.Linear`; ``out``: its Requant), on the kernels' VNNI or AVX2 GEMM with ``packed``
    (:func:`pack_weight` of ``weight_t`` for that GEMM), else on ``at::_int_mm``; ``then``: the values of an
    element-wise module at the 256 int8 outputs, read for each output instead."""
    return torch.ops.iseg_kernels.linear(x, weight_t, bias, out.multiplier, out.shift, int(out.bounds[0]),
                                         int(out.bounds[1]), int(input_offset), out_dtype, then, list(packed))


def pack_weight(weight_t, gemm: str):
    """(K, N) int8 weights packed once for :func:`linear` on the GEMM path ``gemm``: the VNNI GEMM's (int8 panels,
    128 x column sums), the AVX2 GEMM's (int16 panels: twice the weights' bytes); none for the others."""
    if gemm == "vnni":
        return tuple(torch.ops.iseg_kernels.pack_vnni_weight(weight_t))
    if gemm == "avx2":
        return tuple(torch.ops.iseg_kernels.pack_avx2_weight(weight_t))
    return ()


def uint16_matmul_requantize(p, v, out_dyadic, bounds, out_dtype, int8_matmul):
    """``requantize(gemm.uint16_matmul(p, v))`` for probabilities ``p`` in [0, 2**15] and int8 ``v``: the halves
    split in one pass, two int8 GEMMs (``int8_matmul``: the caller's exact int8 GEMM), their products recombined
    and requantized in one pass."""
    batch = torch.broadcast_shapes(p.shape[:-2], v.shape[:-2])
    p, v = p.expand(*batch, *p.shape[-2:]), v.expand(*batch, *v.shape[-2:]).to(torch.int8)
    high, low = torch.ops.iseg_kernels.split_uint16(p)
    colsum = v.sum(-2, dtype=torch.int64)
    return torch.ops.iseg_kernels.combine_requantize(
        int8_matmul(high, v), int8_matmul(low, v), colsum, int(out_dyadic.multiplier), int(out_dyadic.shift),
        int(bounds[0]), int(bounds[1]), out_dtype)


def _axis(mode: str, in_size: int, out_size: int, align_corners: bool) -> tuple[torch.Tensor, int]:
    """One axis of :func:`upsample`: (lo, hi, w_lo, w_hi) rows and their denominator (nearest: (1, 0) / 1)."""
    from ..intops.resize import bilinear_table, nearest_index

    if mode == "nearest":
        idx = nearest_index(in_size, out_size)
        return torch.stack([idx, idx, torch.ones_like(idx), torch.zeros_like(idx)]), 1
    t = bilinear_table(in_size, out_size, align_corners)
    return torch.stack([t.lo, t.hi, t.w_lo, t.w_hi]), t.denominator


def upsample(x, mode: str, size: tuple[int, int], align_corners: bool):
    """``intops.upsample_nearest`` / ``upsample_bilinear`` of (..., H, W) integers, one pass, same dtype."""
    rows, den_r = _axis(mode, x.shape[-2], size[0], align_corners)
    cols, den_c = _axis(mode, x.shape[-1], size[1], align_corners)
    return torch.ops.iseg_kernels.upsample(x, rows, cols, den_r * den_c)


def upsample_class_map(x, mode: str, size: tuple[int, int], align_corners: bool, crop: tuple[int, int],
                       logits: bool = False):
    """``class_map(upsample(x, mode, size, align_corners), crop)`` in the upsampling's pass: the (N, h, w) int64 class
    map alone (the upsampled logits never written), or with ``logits`` the pair (upsampled logits, class map)."""
    rows, den_r = _axis(mode, x.shape[-2], size[0], align_corners)
    cols, den_c = _axis(mode, x.shape[-1], size[1], align_corners)
    if not (crop[0] <= size[0] and crop[1] <= size[1]):
        raise ValueError(f"upsample_class_map: a crop {crop} within the upsampled size {size}")
    classes, full = torch.ops.iseg_kernels.upsample_class_map(x, rows, cols, den_r * den_c, int(crop[0]), int(crop[1]),
                                                              bool(logits))
    return (full, classes) if logits else classes


def class_map(logits, size: tuple[int, int]):
    """``logits[..., :h, :w].argmax(1)`` of (N, C, H, W) integer logits, in one pass."""
    return torch.ops.iseg_kernels.argmax_channels(logits, int(size[0]), int(size[1]))


def pixels_to_int8(pixels, mean_fixed, multiplier):
    """``intops.pixels_to_int8`` of uint8 (B, C, H, W) pixels in one pass (int8, (B, C, H, W) contiguous)."""
    return torch.ops.iseg_kernels.pixels_to_int8(pixels, mean_fixed, multiplier.multiplier, multiplier.shift)


ATTENTION_BLOCK = 64  # query rows per task: their scores and probabilities stay in cache
# the attention's GEMMs by GEMM path (iseg_plugin.ops.gemm): at::_int_mm, the kernels' AVX2 or AVX-512 VNNI one
ATTENTION_GEMMS = {"int_mm": 0, "avx2": 1, "vnni": 2}


def attention(q, kt, v, scores_out, exp, context_out, out_dtype, frac_bits: int, gemm: str):
    """``context_out(uint16 p @ v)`` of ``p = softmax(scores_out(q @ kt))`` (the softmax's exponential ``exp``: its
    table, or bit-exp's element-wise form ``intops.exp.BitExpForm``), fused by blocks of query rows; q, kt, v: int8
    (..., M, D), (..., D, N), (..., N, Dv) of one batch shape. Its GEMMs are ``gemm``'s (a key of ATTENTION_GEMMS:
    the caller's GEMM path)."""
    if isinstance(exp, BitExpForm):
        table, bit_exp = torch.empty(0, dtype=torch.int64), [exp.multiplier, exp.shift, exp.frac_bits, exp.c1, exp.c2,
                                                             exp.k_inter]
    else:
        table, bit_exp = exp.values, []
    batch = q.shape[:-2]
    out = torch.ops.iseg_kernels.attention(
        q.reshape(-1, *q.shape[-2:]), kt.reshape(-1, *kt.shape[-2:]), v.reshape(-1, *v.shape[-2:]),
        int(scores_out.multiplier), int(scores_out.shift), int(scores_out.bounds[0]), int(scores_out.bounds[1]),
        table, int(exp.low), [int(c) for c in bit_exp], int(frac_bits), int(context_out.multiplier), int(context_out.shift),
        int(context_out.bounds[0]), int(context_out.bounds[1]), out_dtype, ATTENTION_BLOCK, ATTENTION_GEMMS[gemm])
    return out.reshape(*batch, *out.shape[-2:])


def sigmoid_gelu(x, i0: int, cap: int | None, frac_bits: int, out_dyadic, bounds, out_dtype, k_inter: int,
                 k_out: int):
    """``requantize(intops.shift_gelu / lambda_shift_gelu(x))`` (``cap`` None: ShiftGELU) over rows of the last dim."""
    return torch.ops.iseg_kernels.sigmoid_gelu(x, int(i0), -1 if cap is None else int(cap), int(frac_bits), int(k_inter),
                                               int(k_out), int(out_dyadic.multiplier), int(out_dyadic.shift),
                                               int(bounds[0]), int(bounds[1]), out_dtype)


def takes(x: torch.Tensor, *multipliers) -> bool:
    """Whether a row / element-wise kernel takes ``x``: :func:`use`, 8- or 16-bit integers, per-tensor dyadics."""
    return use(x) and x.dtype in (torch.int8, torch.int16) and all(m.dim() == 0 for m in multipliers)

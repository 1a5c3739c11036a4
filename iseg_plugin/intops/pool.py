"""Integer pooling: average and adaptive average pooling (window sums + one dyadic requantization), max and
adaptive max pooling (exact).

Every pooling here is separable: a window of the last ``d`` dimensions (1d: tokens, 2d: feature maps) is the
product of one window per axis, so the pool runs axis by axis, each axis reading its windows with one
``index_select`` of a static index table ``(out, kmax)`` into the axis extended by one sentinel element (0 for a
sum, the smallest integer for a max) that stands for padding and for the short windows of adaptive pooling. The
tables depend on the input size and the pool's arguments only: built once at conversion (``*_params``).

* **Average** (``avg_pool``): the int64 window sum, then ``round(sum * S_in / (count * S_out))`` by one dyadic
  multiplier per output position (the count differs at borders with ``count_include_pad=False`` / ``ceil_mode``,
  and between the windows of adaptive pooling), round half up, clamped to ``bits``. The counts are PyTorch's
  (``count_include_pad``, ``ceil_mode``, ``divisor_override``; adaptive: ``floor(o n / out)`` to
  ``ceil((o + 1) n / out)``). Error: at most half an output unit plus the multiplier's ``2**-31`` relative error
  (i.e. the rounding of the exact mean, tested), so with ``S_out = S_in`` the output is within 0.5 LSB of the
  float pool of the dequantized input. Intermediates: ``|sum| <= window elements * max |x|``, which must stay
  below ``2**31`` (an INT16 input: windows of up to 65536 elements).
* **Max** (``max_pool``): the window max, exact (the float pool of the dequantized input, requantized on the same
  grid, gives the same integers); the output keeps the input's scale, zero point and width; padding never wins.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from ._bridge import INT64, as_int64, run_integer
from .dyadic import Dyadic, _requantize_int, dyadic_from_ratio


class AxisWindows(NamedTuple):
    """One axis of a pool: ``index[o]`` lists the input positions of output ``o``'s window (``size``: the
    sentinel), ``count[o]`` its divisor (average pooling)."""

    index: Tensor  # (out, kmax) int64
    count: Tensor  # (out,) int64
    size: int  # input size along the axis


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    """PyTorch's pooling output size (``pooling_output_shape``)."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    if out < 1:
        raise ValueError(f"pool of kernel {kernel}, stride {stride}, padding {padding} gives no output for size {size}")
    return out


def _index(rows: list[list[int]], size: int) -> Tensor:
    kmax = max(len(r) for r in rows)
    return torch.tensor([r + [size] * (kmax - len(r)) for r in rows], dtype=INT64)


def pool_windows(size: int, kernel: int, stride: int | None = None, padding: int = 0, dilation: int = 1,
                 ceil_mode: bool = False, count_include_pad: bool = True) -> AxisWindows:
    """The windows of ``avg_pool`` / ``max_pool`` along one axis of ``size`` (PyTorch's rules)."""
    stride = kernel if stride is None else stride
    if kernel < 1 or stride < 1 or padding < 0 or dilation < 1:
        raise ValueError(f"invalid pool: kernel {kernel}, stride {stride}, padding {padding}, dilation {dilation}")
    if padding > kernel // 2:
        raise ValueError(f"padding {padding} must be at most half the kernel size {kernel} (as in PyTorch)")
    out = _out_size(size, kernel, stride, padding, dilation, ceil_mode)
    rows, counts = [], []
    for o in range(out):
        start = o * stride - padding
        rows.append([p for p in (start + j * dilation for j in range(kernel)) if 0 <= p < size])
        if dilation == 1:  # (average pooling, which has no dilation: PyTorch's divisor)
            end = min(start + kernel, size + padding)
            counts.append(end - start if count_include_pad else min(end, size) - max(start, 0))
        else:
            counts.append(len(rows[-1]))
    return AxisWindows(_index(rows, size), torch.tensor(counts, dtype=INT64), size)


def adaptive_windows(size: int, out: int) -> AxisWindows:
    """The windows of adaptive pooling along one axis: ``floor(o size / out)`` to ``ceil((o + 1) size / out)``."""
    if size < 1 or out < 1:
        raise ValueError(f"adaptive pooling needs sizes >= 1, got {size} -> {out}")
    rows = [list(range((o * size) // out, -((-(o + 1) * size) // out))) for o in range(out)]
    return AxisWindows(_index(rows, size), torch.tensor([len(r) for r in rows], dtype=INT64), size)


def _reduce_axis(x: Tensor, axis: int, windows: AxisWindows, sentinel, reduce: str) -> Tensor:
    """Sum or max of ``x`` over each window of ``axis`` (a negative dim)."""
    shape = list(x.shape)
    if shape[axis] != windows.size:
        raise ValueError(f"pool built for size {windows.size} along dim {axis}, got {shape[axis]}")
    pad_shape = shape.copy()
    pad_shape[axis] = 1
    extended = torch.cat([x, torch.full(pad_shape, sentinel, dtype=x.dtype, device=x.device)], axis)
    out, kmax = windows.index.shape
    picked = extended.index_select(axis, windows.index.flatten().to(x.device))
    pos = len(shape) + axis  # (axis < 0)
    picked = picked.reshape(shape[:pos] + [out, kmax] + shape[pos + 1:])
    k_dim = pos + 1  # the window dim sits right after the output dim
    return picked.sum(k_dim) if reduce == "sum" else picked.amax(k_dim)


def _reduce(x: Tensor, axes: Sequence[AxisWindows], sentinel, reduce: str) -> Tensor:
    d = len(axes)
    for i, windows in enumerate(axes):
        x = _reduce_axis(x, i - d, windows, sentinel, reduce)
    return x


class AvgPoolParams(NamedTuple):
    """Integer constants of an average pool of the last ``len(axes)`` dimensions."""

    axes: tuple[AxisWindows, ...]
    requant: Dyadic  # per output position: S_in / (count S_out), shape (out_1, ..., out_d)
    ratio: Tensor | None  # the same ratio in float64 (QAT gradient and reports only; None on integers)


def _avg_params(axes: tuple[AxisWindows, ...], in_scale: float, out_scale: float | None,
                divisor_override: int | None) -> AvgPoolParams:
    out_scale = in_scale if out_scale is None else out_scale
    if not in_scale > 0 or not out_scale > 0:
        raise ValueError(f"scales must be > 0, got {in_scale}, {out_scale}")
    if divisor_override is not None:
        count = torch.full([len(a.count) for a in axes], float(divisor_override), dtype=torch.float64)
    else:
        count = torch.ones((), dtype=torch.float64)
        for i, a in enumerate(axes):
            shape = [1] * len(axes)
            shape[i] = -1
            count = count * a.count.double().view(shape)
    ratio = float(in_scale) / (count * float(out_scale))
    return AvgPoolParams(axes, dyadic_from_ratio(ratio), ratio)


def _pair(v, d: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * d


def avg_pool_params(in_size: Sequence[int], kernel, stride=None, padding=0, ceil_mode: bool = False,
                    count_include_pad: bool = True, divisor_override: int | None = None, in_scale: float = 1.0,
                    out_scale: float | None = None) -> AvgPoolParams:
    """Conversion-time constants of ``F.avg_pool{d}d`` over the last ``d = len(in_size)`` dims (same arguments;
    ``out_scale`` defaults to ``in_scale``)."""
    d = len(in_size)
    kernel, padding = _pair(kernel, d), _pair(padding, d)
    stride = kernel if stride is None or stride == [] else _pair(stride, d)
    axes = tuple(pool_windows(n, k, s, p, 1, ceil_mode, count_include_pad)
                 for n, k, s, p in zip(in_size, kernel, stride, padding))
    return _avg_params(axes, in_scale, out_scale, divisor_override)


def adaptive_avg_pool_params(in_size: Sequence[int], out_size, in_scale: float = 1.0,
                             out_scale: float | None = None) -> AvgPoolParams:
    """Conversion-time constants of ``F.adaptive_avg_pool{d}d`` (``out_size`` entries None: the input's size)."""
    out_size = _pair(out_size, len(in_size))
    axes = tuple(adaptive_windows(n, n if o is None else o) for n, o in zip(in_size, out_size))
    return _avg_params(axes, in_scale, out_scale, None)


def pool_axes(indices: Sequence[Tensor], sizes: Sequence[int]) -> tuple[AxisWindows, ...]:
    """The windows as a deployed module stores them: each axis' index table and input size (the counts are in the
    average pool's multipliers)."""
    return tuple(AxisWindows(index, index.new_zeros(0), int(size)) for index, size in zip(indices, sizes))


def avg_pool_params_from(axes: tuple[AxisWindows, ...], requant: Dyadic, x: Tensor) -> AvgPoolParams:
    """The constants as a deployed module stores them for input ``x`` (``ratio``, for the QAT gradient only,
    derived from the multipliers for a float ``x``)."""
    return AvgPoolParams(axes, requant, requant.ratio() if x.dtype.is_floating_point else None)


def _avg_pool_int(x: Tensor, m: Tensor, e: Tensor, axes, bits) -> Tensor:
    return _requantize_int(_reduce(as_int64(x), axes, 0, "sum"), m, e, bits)


def avg_pool(x: Tensor, params: AvgPoolParams, bits: int | tuple[int, int] | None = 16) -> Tensor:
    """Integer average pooling (or adaptive average pooling) of the last ``len(params.axes)`` dims.

    * input: integers of scale S_in (zero point 0), ``|x| * window elements < 2**31``;
    * output: ``round_half_up(window sum * S_in / (count * S_out))``, scale S_out, clamped to ``bits`` (signed
      width or ``(lo, hi)``; None: no clamp);
    * intermediates: the int64 window sums; one dyadic multiply per output position (module docstring).
    """
    m, e = params.requant

    def surrogate(xf: Tensor) -> Tensor:
        return _reduce(xf, params.axes, 0.0, "sum") * params.ratio.to(xf.dtype)

    return run_integer(_avg_pool_int, (x,), surrogate, m, e, params.axes, bits)


def max_pool_params(in_size: Sequence[int], kernel, stride=None, padding=0, dilation=1,
                    ceil_mode: bool = False) -> tuple[AxisWindows, ...]:
    """Conversion-time windows of ``F.max_pool{d}d`` over the last ``d = len(in_size)`` dims (same arguments)."""
    d = len(in_size)
    kernel, padding, dilation = _pair(kernel, d), _pair(padding, d), _pair(dilation, d)
    stride = kernel if stride is None or stride == [] else _pair(stride, d)
    return tuple(pool_windows(n, k, s, p, dl, ceil_mode) for n, k, s, p, dl in zip(in_size, kernel, stride, padding, dilation))


def adaptive_max_pool_params(in_size: Sequence[int], out_size) -> tuple[AxisWindows, ...]:
    """Conversion-time windows of ``F.adaptive_max_pool{d}d``."""
    out_size = _pair(out_size, len(in_size))
    return tuple(adaptive_windows(n, n if o is None else o) for n, o in zip(in_size, out_size))


def _max_pool_int(x: Tensor, axes) -> Tensor:
    return _reduce(as_int64(x), axes, torch.iinfo(INT64).min, "max")


def max_pool(x: Tensor, axes: tuple[AxisWindows, ...]) -> Tensor:
    """Integer max pooling (or adaptive max pooling) of the last ``len(axes)`` dims: exact, the input's scale, zero
    point and range (padding and short windows read a sentinel below every integer, which never wins)."""

    def surrogate(xf: Tensor) -> Tensor:
        return _reduce(xf, axes, -math.inf, "max")

    return run_integer(_max_pool_int, (x,), surrogate, axes)


__all__ = ["AxisWindows", "AvgPoolParams", "pool_windows", "adaptive_windows", "avg_pool_params",
           "adaptive_avg_pool_params", "avg_pool", "max_pool_params", "adaptive_max_pool_params", "max_pool"]

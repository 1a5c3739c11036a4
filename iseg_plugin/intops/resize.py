"""Integer upsampling of (N, C, H, W) maps: nearest, and exact bilinear with integer weights.

Nearest (I-Segmenter's choice) only copies values: integer-exact, scale unchanged.

Bilinear with ``align_corners=False`` samples ``src = (dst + 0.5) * in / out - 0.5`` (clamped at
0). Written as ``src = ((2 dst + 1) in - out) / (2 out)`` its fractional weights are rationals with
the common denominator ``D = 2 out``, so integer weights over D are *exact* (no fixed-point
rounding): the result is the exact bilinear value rounded once, half up, i.e. within 0.5 LSB of
the real interpolation and within 1 LSB of ``F.interpolate`` (which adds float rounding). Index
and weight tables depend only on the sizes; the deployed model computes them at conversion.

With ``align_corners=True`` (DPT's fusion blocks and head) ``src = dst (in - 1) / (out - 1)``: rationals with the
denominator ``out - 1``, again exact (``out = 1`` samples row 0, as ``F.interpolate``).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._bridge import INT64, as_int64, run_integer


def nearest_index(in_size: int, out_size: int) -> Tensor:
    """Source index of each output row/column for nearest: floor(dst * in / out), as F.interpolate."""
    return torch.arange(out_size, dtype=INT64) * in_size // out_size


class BilinearTable(NamedTuple):
    """Source indices and integer weights along one axis; weights sum to ``denominator``."""

    lo: Tensor
    hi: Tensor
    w_lo: Tensor
    w_hi: Tensor
    denominator: int


def bilinear_table(in_size: int, out_size: int, align_corners: bool = False) -> BilinearTable:
    """Exact integer bilinear weights for one axis, reduced by their gcd (``align_corners``: F.interpolate's)."""
    dst = torch.arange(out_size, dtype=INT64)
    if align_corners:
        num = dst * (in_size - 1)  # src * (out - 1)
        den = max(out_size - 1, 1)
    else:
        num = ((2 * dst + 1) * in_size - out_size).clamp_min(0)  # src * 2 * out
        den = 2 * out_size
    lo = num // den
    w_hi = num - lo * den
    g = math.gcd(den, *w_hi.tolist())
    hi = (lo + 1).clamp_max(in_size - 1)
    return BilinearTable(lo, hi, (den - w_hi) // g, w_hi // g, den // g)


def _nearest_int(x: Tensor, size: tuple[int, int]) -> Tensor:
    x = as_int64(x)
    rows = nearest_index(x.shape[-2], size[0])
    cols = nearest_index(x.shape[-1], size[1])
    return x.index_select(-2, rows).index_select(-1, cols)


def upsample_nearest(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest resize of integers to ``size`` = (H_out, W_out); same values, same scale."""
    return run_integer(_nearest_int, (x,), lambda xf: F.interpolate(xf, size=size, mode="nearest"), size)


def _interp_axis(x: Tensor, table: BilinearTable, dim: int) -> Tensor:
    shape = [1] * x.dim()
    shape[dim] = -1
    return (
        x.index_select(dim, table.lo) * table.w_lo.reshape(shape)
        + x.index_select(dim, table.hi) * table.w_hi.reshape(shape)
    )


def _bilinear_int(x: Tensor, size: tuple[int, int], align_corners: bool = False) -> Tensor:
    x = as_int64(x)
    rows = bilinear_table(x.shape[-2], size[0], align_corners)
    cols = bilinear_table(x.shape[-1], size[1], align_corners)
    acc = _interp_axis(_interp_axis(x, cols, -1), rows, -2)  # exact value * rows.den * cols.den
    den = rows.denominator * cols.denominator
    return torch.div(2 * acc + den, 2 * den, rounding_mode="floor")  # round half up


def upsample_bilinear(x: Tensor, size: tuple[int, int], align_corners: bool = False) -> Tensor:
    """Bilinear resize of integers, exact weights, one rounding (half up).

    * input: integers, ``max|x| * D_h * D_w < 2**61`` where ``D = 2 out / gcd`` per axis (32 per
      axis for a x16 upsampling, so any INT32 input; ``align_corners=True``: ``D = (out - 1) / gcd``);
    * output: same scale, within 1 LSB of ``F.interpolate(..., 'bilinear', align_corners=align_corners)``
      (within 0.5 LSB of the exact interpolation).
    """
    return run_integer(
        _bilinear_int,
        (x,),
        lambda xf: F.interpolate(xf, size=size, mode="bilinear", align_corners=align_corners),
        size,
        align_corners,
    )

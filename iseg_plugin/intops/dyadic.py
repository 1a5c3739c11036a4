"""Dyadic requantization: I_out = round(I_in * S_in / S_out) with an integer multiplier and shift.

At conversion, the float ratio ``r = S_in / S_out`` becomes ``r ~= m / 2**e`` with a 31-bit
signed multiplier ``m`` (``2**30 <= |m| < 2**31``) and ``0 <= e <= 62``. At run time only integers
are used: ``I_out = (I_in * m + 2**(e-1)) >> e`` in int64 (round half up, as gemmlowp's
``MultiplyByQuantizedMultiplier``), exact for every ``|I_in| < 2**31``, with no float64 shortcut
(I-ViT's ``fixedpoint_mul`` rounds in float64, inexact once ``|I_in * m| > 2**53``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._bridge import INT64, as_int64, round_shift, run_integer
from .quantize import int_range

MULT_BITS = 31
MAX_SHIFT = 62


class Dyadic(NamedTuple):
    """An integer multiplier and right shift: the real ratio ``multiplier / 2**shift``."""

    multiplier: Tensor
    shift: Tensor

    def ratio(self) -> Tensor:
        """The float64 ratio this pair stands for (for reporting and tests, not for inference)."""
        return self.multiplier.double() / torch.pow(2.0, self.shift.double())


def dyadic_from_ratio(ratio: Tensor | float) -> Dyadic:
    """Turn float ratios (scalar or per channel, any sign) into int64 (multiplier, shift) pairs.

    The mantissa is rounded to the nearest 31-bit integer; a ratio of 0 gives (0, 0). The
    relative error is at most 2**-31. Ratios too small for a 62-bit shift lose low multiplier
    bits (the ratio is then below 2**-31, which no 8/16-bit output can show); ratios of 2**31 or
    more are refused.
    """
    r = torch.as_tensor(ratio, dtype=torch.float64)
    if not torch.isfinite(r).all():
        raise ValueError(f"requantization ratio must be finite, got {r}")
    mant, exp = torch.frexp(r)  # r = mant * 2**exp, 0.5 <= |mant| < 1
    m = torch.round(mant * 2.0**MULT_BITS).to(INT64)
    exp = exp.to(INT64)
    carry = m.abs() == (1 << MULT_BITS)  # mantissa rounded up to 1.0
    m = torch.where(carry, m // 2, m)
    exp = exp + carry.to(INT64)
    e = MULT_BITS - exp
    if (e < 0).any():
        raise ValueError(f"requantization ratio {r.abs().max().item():.3g} is >= 2**31: scales are inconsistent")
    too_far = (e - MAX_SHIFT).clamp_min(0)
    m = round_shift(m, too_far)
    e = e - too_far
    zero = m == 0
    return Dyadic(torch.where(zero, 0, m), torch.where(zero, 0, e))


def _requantize_int(x: Tensor, multiplier: Tensor, shift: Tensor, bits: int | tuple[int, int] | None,
                    fits_int32: bool = False) -> Tensor:
    out = as_int64(x) * multiplier  # a new tensor: the steps below work in place (fewer allocations)
    if shift.dim() == 0:
        out.add_((1 << int(shift)) >> 1).bitwise_right_shift_(int(shift))
    else:
        out = round_shift(out, shift)
    if bits is not None:
        lo, hi = int_range(bits)
        if fits_int32 or int(shift.min()) >= MULT_BITS:  # (with |I_in * m| < 2**62, |out| < 2**31)
            # clamped in int32: the same integers, and an exact, fast Clip in onnxruntime (its int64 one is not exact)
            return out.to(torch.int32).clamp_(lo, hi).to(INT64)
        out.clamp_(lo, hi)
    return out


def _int32_input_bounds(x: Tensor, dyadic: Dyadic, bits: int | tuple[int, int] | None) -> tuple[int, int] | None:
    """For an int32 input and a scalar dyadic with a small shift (a ratio >= 1, where the output need
    not fit 32 bits): the input range ``[x_lo, x_hi]`` outside of which the clamped output no longer
    changes. x_hi is the smallest input whose output reaches ``hi``, x_lo the largest whose output is
    at most ``lo`` (the output is non-decreasing in the input), so clamping the input there first gives
    the same integers, and outputs that fit 32 bits. None where this does not apply."""
    m, e = dyadic
    if bits is None or x.dtype != torch.int32 or m.dim() != 0 or int(m) <= 0 or not 1 <= int(e) < MULT_BITS:
        return None
    m, e = int(m), int(e)
    lo, hi = int_range(bits)
    if max(-lo, hi) >= 1 << 29:  # outputs up to a ratio (< 2**30) past the bounds must still fit 32 bits
        return None
    half = 1 << (e - 1)
    x_hi = -((half - (hi << e)) // m)  # ceil((hi * 2**e - half) / m)
    x_lo = (((lo + 1) << e) - half - 1) // m
    info = torch.iinfo(torch.int32)
    return max(x_lo, info.min), min(x_hi, info.max)


def requantize(x: Tensor, dyadic: Dyadic, bits: int | tuple[int, int] | None = 8) -> Tensor:
    """I_out = clamp(round_half_up(I_in * m / 2**e)) in int64.

    * input: integers with ``|I_in| < 2**31`` (an INT32 accumulator at most);
    * ``dyadic``: scalar, or per channel broadcast against the last dimension;
    * output: scale S_out; clamped to a signed ``bits``-wide integer, or to explicit ``(lo, hi)``
      bounds (an asymmetric grid, see :mod:`.quantize`); no clamp if ``bits`` is None;
    * rounding: half up, exact (int64 product < 2**62);
    * an int32 input may first be clamped to where the clamped output stops changing (same integers,
      see :func:`_int32_input_bounds`), so that every step after the product fits 32 bits.
    """
    m, e = dyadic
    bounds = _int32_input_bounds(x, dyadic, bits)
    if bounds is not None:
        x = x.clamp(*bounds)
    return run_integer(
        _requantize_int, (x,), lambda xf: xf * dyadic.ratio().to(xf.dtype), m, e, bits, bounds is not None
    )


def _requantize_add_int(a: Tensor, b: Tensor, ma: Tensor, ea: Tensor, mb: Tensor, eb: Tensor, bits: int) -> Tensor:
    lo, hi = int_range(bits)
    return (_requantize_int(a, ma, ea, None) + _requantize_int(b, mb, eb, None)).clamp(lo, hi)


def requantize_add(a: Tensor, da: Dyadic, b: Tensor, db: Dyadic, bits: int = 16) -> Tensor:
    """Residual add of two integer tensors of different scales into one output scale.

    Each operand is requantized to S_out on its own (round half up) and the two are added and
    clamped to ``bits`` (I-ViT's residual QuantAct). Error: at most 1 output LSB against the
    exact real sum, before clamping.
    """
    def surrogate(af: Tensor, bf: Tensor) -> Tensor:
        return af * da.ratio().to(af.dtype) + bf * db.ratio().to(bf.dtype)

    return run_integer(_requantize_add_int, (a, b), surrogate, da.multiplier, da.shift, db.multiplier, db.shift, bits)

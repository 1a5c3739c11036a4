"""Integer GELUs: I-ViT's ShiftGELU, I-Segmenter's lambda-ShiftGELU and IPTQ-ViT's Poly-GELU.

All three return ``I_x * phi`` with ``phi`` in ``[0, 2**(k_out-1)]`` (scale ``2**-(k_out-1)``),
so the output scale is ``S * 2**-(k_out-1)`` and, for INT8 input and k_out = 8, the output fits
INT16 (``|out| <= 128 * 128``). The next requantization brings it back to INT8.

ShiftGELU (I-ViT) computes ``GELU(x) ~ x * sigmoid(1.702 x)`` with
``sigmoid(z) = e**(z - m) / (e**(z - m) + e**-m)``, m the row max, each exponential by ShiftExp
(``k_inter = 23``). Its failure (reference §7): when one channel of a row is an outlier
(``x_max >~ 9.4``) both exponentials hit the ``-k_inter`` clamp for the bulk of the row, sigmoid
becomes 1/2 and GELU(x) becomes x/2.

**lambda-ShiftGELU, the reading implemented here.** The paper (eq. 11) says lambda "relaxes the
lower bound" of that clamp; read literally (clamp at ``-lambda * k_inter`` with the same shift
``2**(k_inter - q)``) it right-shifts both exponentials to 0 and divides 0 by 0 on long-tailed
rows (NaN for every entry of a 3072-channel row once x_max >= 12, reference §7a), and widening the
shift instead needs 2**138 (§7b). We therefore relax the bound where it binds: the reference m is
capped at ``lambda`` (real units of x, converted once to an integer cap). Rows whose max is
below lambda are computed as ShiftGELU; on long-tailed rows the clamp moves from
``x_max - 9.4`` down to ``lambda - 9.4 = -3.4`` (where GELU is ~0) instead of following the
outlier, and entries above lambda use ``sigmoid(1.702 lambda) = 0.99996``. The denominator is then
at least ``e**(-1.702 lambda)`` in ShiftExp units (> 2**7), so there is never a division by 0 and
every intermediate stays below ``i0 * 2**(k_inter + 1)``. Measured in ``docs/op_fidelity.md``
(``benchmarks/op_fidelity.py``): on long-tailed rows its RMSE is far below ShiftGELU's.
Both variants also take ``m >= 0`` (a reference below 0 would make ``e**-m`` overflow on
all-negative rows; for rows with a positive entry nothing changes).
"""
from __future__ import annotations

import hashlib
import math
from typing import NamedTuple

import torch
from torch import Tensor

from ._bridge import as_int64, bit_length, divide, round_shift, run_integer
from .dyadic import Dyadic, dyadic_from_ratio, requantize
from .exp import exp_i0, shift_exp_lookup

LAMBDA_DEFAULT = 6.0
K_INTER_GELU = 23


def _float_gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def mul_1702(x: Tensor) -> Tensor:
    """x * 1.1011b (= 1.6875 ~ 1.702) by shift-add: x + (x>>1) + (x>>3) + (x>>4) (I-Segmenter eq. 7)."""
    sr = torch.bitwise_right_shift
    return x + sr(x, 1) + sr(x, 3) + sr(x, 4)


class LambdaGeluParams(NamedTuple):
    """Integer constants of lambda-ShiftGELU for one input scale S."""

    i0: int  # round(2**frac_bits / S): one real unit, in input integers shifted left by frac_bits
    cap: int  # round(lambda * 2**frac_bits / S): lambda in the same units
    frac_bits: int  # extra fraction bits given to the input before ShiftExp


def lambda_shift_gelu_params(scale: float, lam: float = LAMBDA_DEFAULT, frac_bits: int = 4) -> LambdaGeluParams:
    """Conversion-time constants of lambda-ShiftGELU (paper defaults lambda = 6, k_inter = 23).

    ``frac_bits`` shifts the input left before ShiftExp so that I0 = round(2**frac_bits / S) is
    precise: with frac_bits = 0 (I-ViT) a coarse scale such as S = 0.31 gives I0 = 3, a 5 %
    error in every exponent and a 2-bit fraction. 4 bits cut the RMSE on long-tailed rows ~2-4x.
    """
    if lam <= 0:
        raise ValueError(f"lambda must be > 0, got {lam}")
    unit = 2.0**frac_bits / float(scale)
    return LambdaGeluParams(max(1, round(unit)), round(lam * unit), frac_bits)


def _sigmoid_gelu_int(
    x: Tensor, i0: int, cap: int | None, frac_bits: int, k_inter: int, k_out: int, dim: int
) -> Tensor:
    x = as_int64(x)
    xs = torch.bitwise_left_shift(x, frac_bits)
    z = mul_1702(xs if cap is None else xs.clamp_max(cap))
    ref = z.amax(dim, keepdim=True).clamp_min(0)
    e1 = shift_exp_lookup(z - ref, i0, k_inter)  # e**(z - m)
    e2 = shift_exp_lookup(-ref, i0, k_inter)  # e**(-m) > 0
    return x * divide(e1, e1 + e2, k_out - 1)


def _gelu_surrogate(i0: int, k_out: int, frac_bits: int = 0):
    """The float GELU in integer units: one real unit is i0 / 2**frac_bits input integers, and the
    output scale is 2**-(k_out-1) of the input's (evaluated on the float path only)."""

    def surrogate(xf: Tensor) -> Tensor:
        unit = i0 / 2.0**frac_bits
        return _float_gelu(xf / unit) * (unit * 2.0 ** (k_out - 1))

    return surrogate


def shift_gelu(x: Tensor, i0: int, k_inter: int = K_INTER_GELU, k_out: int = 8, dim: int = -1) -> Tensor:
    """ShiftGELU (I-ViT, with the paper's 1.6875 shift-add): integer GELU of ``x * S``.

    * input: integers (INT8 in the encoder) of scale S, ``i0 = exp_i0(S)``; rows along ``dim``;
    * output: ``x * sigma`` with sigma in ``[0, 2**(k_out-1)]``, scale ``S * 2**-(k_out-1)``;
    * rounding: floors inside ShiftExp, round-half-up in the division;
    * intermediates: exponentials ``<= i0 * 2**k_inter``, their sum ``<= i0 * 2**(k_inter+1)``.
    """
    return run_integer(_sigmoid_gelu_int, (x,), _gelu_surrogate(i0, k_out), i0, None, 0, k_inter, k_out, dim)


def lambda_shift_gelu(
    x: Tensor, params: LambdaGeluParams, k_inter: int = K_INTER_GELU, k_out: int = 8, dim: int = -1
) -> Tensor:
    """lambda-ShiftGELU (I-Segmenter): ShiftGELU whose sigmoid reference is capped at lambda.

    ``params = lambda_shift_gelu_params(S, lam, frac_bits)``; see the module docstring for the
    reading implemented and why. With ``frac_bits = 0`` it equals :func:`shift_gelu` on rows
    whose max is below lambda. Same output contract as :func:`shift_gelu`; never divides by
    zero, never produces NaN/inf; exponentials ``<= i0 * 2**k_inter`` with ``i0 ~ 2**frac_bits / S``.
    """
    return run_integer(
        _sigmoid_gelu_int,
        (x,),
        _gelu_surrogate(params.i0, k_out, params.frac_bits),
        params.i0,
        params.cap,
        params.frac_bits,
        k_inter,
        k_out,
        dim,
    )


# ---------------------------------------------------------------------------------------------
# Poly-GELU (IPTQ-ViT): GELU(x) = x/2 (1 + L(x / sqrt 2)), L(u) = sign(u) [a (min(|u|, -b) + b)**4 + 1]


class PolyGeluParams(NamedTuple):
    """Integer constants of Poly-GELU for one input scale."""

    clip: int  # -b * sqrt(2) / S: where |x| is clipped, in input integers
    pre_shift: int  # right shift of (clip - |x|)**4 keeping it below 2**31
    poly: Dyadic  # a * S**4 / 4 * 2**(k_out-2) * 2**pre_shift: the quartic in units of 2**-(k_out-2)
    i0: int  # round(1 / S), used only for the QAT gradient (the float GELU it approximates)


# samples' digest -> fitted (a, b): a QAT step lowers the model again for each batch, on the same samples
_FITTED: dict[bytes, tuple[float, float]] = {}


def fit_poly_gelu(samples: Tensor, b_grid: Tensor | None = None) -> tuple[float, float]:
    """Fit Poly-GELU's (a, b) to calibration inputs (IPTQ-ViT's data-aware fit).

    IPTQ-ViT fits L to erf over the observed range; we minimise the GELU output error over the
    observed samples themselves, so the fit is weighted by where the data lies. For each b on the
    grid, a has a closed form (the approximation is linear in a); the best (a, b) is returned.
    """
    x = samples.detach().double().flatten()
    if x.numel() == 0:
        raise ValueError("Poly-GELU needs at least one calibration sample to fit (a, b)")
    key = hashlib.blake2b(x.numpy().tobytes()).digest() if b_grid is None else None
    if key in _FITTED:
        return _FITTED[key]
    if x.numel() > 200_000:
        x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:200_000]]
    if b_grid is None:
        b_grid = -torch.arange(0.3, 5.0001, 0.01, dtype=torch.float64)
    u = x / math.sqrt(2.0)
    target = _float_gelu(x)
    # the terms that do not depend on b, computed once (the same arithmetic as per b: the same fit)
    u_abs, base, half_signed = u.abs(), 0.5 * x * (1 + torch.sign(u)), 0.5 * x * torch.sign(u)
    residual = target - base
    best = (math.inf, -0.2888, -1.769)
    for b in b_grid.tolist():
        lin = half_signed * (torch.clamp(u_abs, max=-b) + b) ** 4
        denom = (lin * lin).sum()
        a = float((lin * residual).sum() / denom) if denom > 0 else 0.0
        err = float(((base + a * lin - target) ** 2).sum())
        if err < best[0]:
            best = (err, a, b)
    if key is not None:
        if len(_FITTED) >= 4096:
            _FITTED.clear()
        _FITTED[key] = best[1], best[2]
    return best[1], best[2]


def poly_gelu_params(a: float, b: float, scale: float, k_out: int = 8) -> PolyGeluParams:
    """Integer constants of Poly-GELU for fitted (a, b) and input scale S (conversion time)."""
    if b >= 0:
        raise ValueError(f"Poly-GELU's b must be < 0 (it is minus the clip point), got {b}")
    clip = max(1, round(-b * math.sqrt(2.0) / float(scale)))
    quartic_bits = int(bit_length(torch.tensor(clip**4)))
    pre_shift = max(0, quartic_bits - 31)
    ratio = a * float(scale) ** 4 / 4.0 * 2.0 ** (k_out - 2) * 2.0**pre_shift
    return PolyGeluParams(clip, pre_shift, dyadic_from_ratio(ratio), exp_i0(scale))


def _poly_gelu_int(x: Tensor, clip: int, pre_shift: int, m: Tensor, e: Tensor, k_out: int) -> Tensor:
    x = as_int64(x)
    c = x.abs().clamp_max(clip) - clip  # (min(|u|, -b) + b) * sqrt(2) / S, <= 0
    quartic = round_shift((c * c) * (c * c), pre_shift)  # < 2**31
    one = 1 << (k_out - 2)
    erf_abs = (requantize(quartic, Dyadic(m, e), bits=None) + one).clamp(0, one)  # |L| in units 2**-(k_out-2)
    phi = one + torch.sign(x) * erf_abs  # (1 + L) / 2 in units of 2**-(k_out-1), in [0, 2**(k_out-1)]
    return x * phi


def poly_gelu(x: Tensor, params: PolyGeluParams, k_out: int = 8) -> Tensor:
    """Poly-GELU (IPTQ-ViT, data-aware quartic erf): integer GELU of ``x * S``.

    * input: integers of scale S; ``params = poly_gelu_params(a, b, S)`` from :func:`fit_poly_gelu`;
    * output: ``x * phi``, phi in ``[0, 2**(k_out-1)]``, scale ``S * 2**-(k_out-1)`` (as ShiftGELU);
    * intermediates: ``(clip - |x|)**4 >> pre_shift < 2**31``, erf in ``[-2**(k_out-2), 2**(k_out-2)]``;
    * rounding: half up in the two shifts. Element-wise: no row reduction.
    """
    m, e = params.poly
    return run_integer(
        _poly_gelu_int, (x,), _gelu_surrogate(params.i0, k_out), params.clip, params.pre_shift, m, e, k_out
    )

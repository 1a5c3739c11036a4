"""Integer square root, I-LayerNorm and integer L2 normalisation.

Both normalisations divide by a per-row square root. I-ViT computes ``floor(sqrt(V))`` with 10
Newton steps from 2**16, which is wrong for small V (V=100 gives 64, reference §6), keeps the sum
of squares V in 32 bits (it overflows for INT16 rows of 768 channels) and multiplies by
``floor((2**31-1) / sigma)``, which keeps only ~12 bits once sigma is large. Here V is int64,
:func:`isqrt` is exact, and the root is taken of V scaled up to ~62 bits so that it carries ~31
significant bits whatever the row's variance (I-BERT pre-shifts V down; we shift it up).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ._bridge import as_int64, bit_length, round_shift, run_integer
from .dyadic import Dyadic, requantize
from .quantize import quantize

ISQRT_MAX_BITS = 62
MEAN_FRAC_BITS = 4  # the row mean keeps 4 fraction bits (I-ViT rounds it to an integer)
_NEWTON_STEPS = 6  # from a start within 2x of the root, 5 steps reach 1e-15 relative error, the 6th the unit


def isqrt(x: Tensor) -> Tensor:
    """floor(sqrt(x)) exactly, for every int64 ``0 <= x < 2**62``.

    Newton's integer iteration ``y <- (y + x // y) // 2`` from ``2**ceil(bits(x)/2) >= sqrt(x)``
    (the paper's bit-length start) never goes below the root and decreases onto it; six steps
    reach it (``minimum`` stops the s, s+1 oscillation when x + 1 is a square). Raises on
    negative or too large inputs.
    """
    x = as_int64(x)
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= 1 << ISQRT_MAX_BITS):
        raise ValueError("isqrt is defined for 0 <= x < 2**62")
    y = torch.bitwise_left_shift(torch.ones_like(x), (bit_length(x) + 1) // 2)
    for _ in range(_NEWTON_STEPS):
        y = torch.minimum(y, (y + torch.div(x, y, rounding_mode="floor")) // 2).clamp_min(1)
    return torch.where(x == 0, 0, y)


def _divide_by_root(y: Tensor, sumsq: Tensor, frac_bits: int) -> Tensor:
    """round(y * 2**frac_bits / sqrt(sumsq)) for |y| <= sqrt(sumsq) (0 where sumsq is 0).

    sumsq is shifted left by 2s so that its root R ~ sqrt(sumsq) * 2**s has ~31 bits; one
    reciprocal floor(2**61 / R) per row then gives the quotient to ~2**-30 relative error.
    """
    s = (ISQRT_MAX_BITS - 1 - bit_length(sumsq)) // 2  # 0 <= s <= 30
    root = isqrt(torch.bitwise_left_shift(sumsq, 2 * s)).clamp_min(1)
    recip = torch.div(torch.tensor(1 << 61, dtype=root.dtype), root, rounding_mode="floor")  # as in divide
    return round_shift(y * recip, 61 - frac_bits - s)


class LayerNormParams(NamedTuple):
    """Integer affine of I-LayerNorm and the real scale of its output."""

    weight: Tensor  # gamma / s_gamma, INT16, per channel
    bias: Tensor  # beta / out_scale, clamped to +-2**30, per channel
    out_scale: float  # sqrt(C) * 2**-norm_bits * s_gamma


def layernorm_params(gamma: Tensor, beta: Tensor, norm_bits: int = 15, weight_bits: int = 16) -> LayerNormParams:
    """Quantize LayerNorm's affine for :func:`i_layernorm` (conversion time, or every QAT step).

    gamma is quantized per tensor to ``weight_bits`` (not folded into a per-channel scale as in
    I-ViT, whose bias ``beta / gamma`` blows up when gamma ~ 0); beta to the output scale. The
    integers are float tensors with straight-through gradients to gamma and beta.
    """
    channels = gamma.numel()
    s_gamma = float(gamma.detach().abs().max().clamp_min(1e-12)) / ((1 << (weight_bits - 1)) - 1)
    out_scale = math.sqrt(channels) * 2.0**-norm_bits * s_gamma
    weight = quantize(gamma, torch.tensor(s_gamma, dtype=gamma.dtype), weight_bits)
    bias = torch.clamp(quantize(beta, torch.tensor(out_scale, dtype=beta.dtype), 32), -(2**30), 2**30)
    return LayerNormParams(weight, bias, out_scale)


def layernorm_eps(eps: float, in_scale: float) -> int:
    """LayerNorm's eps in squared input integers, round(eps / S**2), capped at 2**40 (conversion time)."""
    return min(round(eps / float(in_scale) ** 2), 1 << 40)


def _i_layernorm_int(
    x: Tensor, weight: Tensor, bias: Tensor, eps: int, m: Tensor | None, e: Tensor | None, out_bits: int,
    norm_bits: int,
) -> Tensor:
    channels = x.shape[-1]
    xs = torch.bitwise_left_shift(x, MEAN_FRAC_BITS)
    mean = torch.div(2 * xs.sum(-1, keepdim=True) + channels, 2 * channels, rounding_mode="floor")  # round half up
    y = xs - mean  # x - mean with MEAN_FRAC_BITS fraction bits
    sumsq = (y * y).sum(-1, keepdim=True) + (channels * eps << (2 * MEAN_FRAC_BITS))  # C (var + eps) * 2**8
    normed = _divide_by_root(y, sumsq, norm_bits)  # (x - mean) / sqrt(C (var + eps)) * 2**norm_bits
    z = normed * weight + bias
    if m is None:
        return z
    return requantize(z, Dyadic(m, e), bits=out_bits)


def i_layernorm(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: int = 0,
    out: Dyadic | None = None,
    out_bits: int = 8,
    norm_bits: int = 15,
) -> Tensor:
    """I-LayerNorm over the last dimension, optionally fused with the output requantization.

    * input: integers of any scale S (it cancels), C channels; ``C * max|x - mean|**2 < 2**54``
      (INT16 rows of any practical width; INT32 rows must be requantized first);
    * the mean keeps 4 fraction bits (rounded half up): I-ViT's integer mean is off by up to
      half an LSB, which on rows of small variance shifts every output;
    * ``V = sum (x - mean)**2 + C * eps`` in int64 (times 2**8), where ``eps`` is
      LayerNorm's eps in squared input integers (:func:`layernorm_eps`; I-ViT drops it, which
      blows up rows of small variance such as near-uniform class masks); a constant row with
      ``eps = 0`` gives ``bias``;
    * normalised ``n = round((x - mean) * 2**norm_bits / sqrt(V))``, ``|n| <= 2**norm_bits``;
    * ``weight``, ``bias``: the integer affine of :func:`layernorm_params` (INT16 gamma, beta at the
      output scale);
    * output ``z = n * weight + bias``, ``|z| < 2**31``, scale ``LayerNormParams.out_scale``; if
      ``out`` is given, ``requantize(z, out, out_bits)`` instead (scale of the next layer's input).
    """
    m, e = (None, None) if out is None else out

    def surrogate(xf: Tensor, wf: Tensor, bf: Tensor) -> Tensor:
        ref = torch.nn.functional.layer_norm(xf, xf.shape[-1:], eps=max(eps, 1))  # at least 1 LSB**2
        z = ref * (2.0**norm_bits / math.sqrt(xf.shape[-1])) * wf + bf
        return z if out is None else z * out.ratio().to(xf.dtype)

    return run_integer(_i_layernorm_int, (x, weight, bias), surrogate, eps, m, e, out_bits, norm_bits)


def _l2_normalize_int(x: Tensor, frac_bits: int) -> Tensor:
    x = as_int64(x)
    return _divide_by_root(x, (x * x).sum(-1, keepdim=True), frac_bits)


def l2_normalize(x: Tensor, frac_bits: int = 15) -> Tensor:
    """Integer L2 normalisation over the last dimension (Segmenter's decoder; the paper drops it).

    * input: integers of any scale (it cancels), ``sum x**2 < 2**62``;
    * output: ``round(x * 2**frac_bits / ||x||)``, in ``[-2**frac_bits, 2**frac_bits]``, scale
      ``2**-frac_bits``; a zero row stays zero (``F.normalize`` with its eps does the same);
    * error: within 1 output LSB of ``F.normalize(x) * 2**frac_bits``.
    """
    return run_integer(
        _l2_normalize_int,
        (x,),
        lambda xf: torch.nn.functional.normalize(xf, dim=-1) * 2.0**frac_bits,
        frac_bits,
    )

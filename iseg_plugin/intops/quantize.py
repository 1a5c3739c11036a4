"""Symmetric uniform quantization and the EMA range update (I-ViT §3.1, I-Segmenter eq. 2-4).

These are the float-to-integer steps: they run in training, calibration and conversion, never in
the deployed forward (which receives integers and only requantizes them, see :mod:`.dyadic`).

Rules (``../shared/reference/algorithms.md`` §1, §3):

* scale ``S = max(|min|, |max|) / (2**(bits-1) - 1)``, clamped to at least float32 eps; zero point 0;
* ``I = clamp(round(x / S), -2**(bits-1), 2**(bits-1) - 1)``: full range (-128 allowed) unless
  ``narrow`` (then -127..127, as Brevitas' weight quantizers);
* ``round`` is round-half-to-even (``torch.round``), the rule of Brevitas and torch.ao, so both
  front ends produce the same weight integers; integer requantization rounds half up instead;
* the straight-through gradient of round is the identity; clamped values get no gradient.

Asymmetric grids (beyond I-ViT, for activations that are almost never negative, such as GELU's
output): ``S = (max(max, 0) - min(min, 0)) / (2**bits - 1)`` and the integers span
``[lo, lo + 2**bits - 1]`` with ``lo = round(min / S)``. The integers still mean ``I * S`` (no
zero point is carried): a GEMM that needs int8 subtracts ``lo + 2**(bits-1)`` and adds it back
through its bias, so the grid costs nothing at run time and gains one bit.
"""
from __future__ import annotations

import torch
from torch import Tensor

SCALE_EPS = torch.finfo(torch.float32).eps


def int_range(bits: int | tuple[int, int], narrow: bool = False, signed: bool = True) -> tuple[int, int]:
    """(min, max) of a ``bits``-wide integer; explicit ``(lo, hi)`` bounds are returned as they are."""
    if not isinstance(bits, int):
        lo, hi = bits
        return int(lo), int(hi)
    if not signed:
        return 0, (1 << bits) - 1
    hi = (1 << (bits - 1)) - 1
    return (-hi if narrow else -hi - 1), hi


def symmetric_scale(min_val: Tensor, max_val: Tensor, bits: int) -> Tensor:
    """S = max(|min|, |max|) / (2**(bits-1) - 1), element-wise (per tensor or per channel)."""
    absmax = torch.maximum(min_val.abs(), max_val.abs())
    return absmax.clamp_min(SCALE_EPS) / ((1 << (bits - 1)) - 1)


def asymmetric_scale(min_val: Tensor, max_val: Tensor, bits: int) -> Tensor:
    """S = (max(max, 0) - min(min, 0)) / (2**bits - 1): ``2**bits`` levels over a range that holds 0."""
    span = max_val.clamp_min(0) - min_val.clamp_max(0)
    return span.clamp_min(SCALE_EPS) / ((1 << bits) - 1)


def asymmetric_bounds(min_val: Tensor, scale: Tensor, bits: int) -> tuple[int, int]:
    """Integer bounds ``(lo, lo + 2**bits - 1)`` of an asymmetric grid, ``lo = round(min(min, 0) / S)``."""
    lo = int(torch.round(min_val.clamp_max(0).double() / scale.double()))
    return lo, lo + (1 << bits) - 1


def channel_minmax(x: Tensor, channel_dim: int | None = None) -> tuple[Tensor, Tensor]:
    """Min and max of ``x``: scalars if ``channel_dim`` is None, else one per channel."""
    if channel_dim is None:
        return x.detach().amin(), x.detach().amax()
    flat = x.detach().movedim(channel_dim, 0).flatten(1)
    return flat.amin(1), flat.amax(1)


def ema_minmax(
    running: tuple[Tensor, Tensor] | None,
    x: Tensor,
    momentum: float,
    channel_dim: int | None = None,
) -> tuple[Tensor, Tensor]:
    """EMA of the min and max of ``x``: m <- (1 - momentum) * m + momentum * current.

    ``momentum`` is the weight of the new batch (the paper's alpha: 0.05 for PTQ, 0.01 for
    QAT; I-ViT's ``act_range_momentum=0.95`` is 1 - alpha). The first call (``running`` None)
    takes the batch's range as it is.
    """
    if not 0.0 < momentum <= 1.0:
        raise ValueError(f"momentum must be in (0, 1], got {momentum}")
    cur_min, cur_max = channel_minmax(x, channel_dim)
    if running is None:
        return cur_min, cur_max
    run_min, run_max = running
    return run_min + momentum * (cur_min - run_min), run_max + momentum * (cur_max - run_max)


def round_ste(x: Tensor) -> Tensor:
    """``torch.round`` (half to even) whose gradient is the identity (straight through)."""
    return x + (torch.round(x) - x).detach()


def quantize(x: Tensor, scale: Tensor, bits: int | tuple[int, int], narrow: bool = False, channel_dim: int | None = None) -> Tensor:
    """Fake-quantize to integers: clamp(round(x / S)) as a float tensor holding integers.

    ``scale`` is a scalar, or one value per channel along ``channel_dim``; ``bits`` is a signed
    width or explicit ``(lo, hi)`` bounds (an asymmetric grid). Round passes the
    gradient straight through; values clamped at the range ends get no gradient.
    """
    if channel_dim is not None:
        shape = [1] * x.dim()
        shape[channel_dim] = -1
        scale = scale.reshape(shape)
    lo, hi = int_range(bits, narrow)
    return torch.clamp(round_ste(x / scale), lo, hi)

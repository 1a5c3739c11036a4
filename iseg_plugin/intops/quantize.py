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
        return torch.aminmax(x.detach())  # (one pass over x)
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
    return ema_step(running, channel_minmax(x, channel_dim), momentum)


def ema_step(running: tuple[Tensor, Tensor] | None, current: tuple[Tensor, Tensor],
             momentum: float) -> tuple[Tensor, Tensor]:
    """:func:`ema_minmax` from the batch's (min, max) ``current``, already taken."""
    if not 0.0 < momentum <= 1.0:
        raise ValueError(f"momentum must be in (0, 1], got {momentum}")
    cur_min, cur_max = current
    if running is None:
        return cur_min, cur_max
    run_min, run_max = running
    return run_min + momentum * (cur_min - run_min), run_max + momentum * (cur_max - run_max)


def running_minmax(
    running: tuple[Tensor, Tensor] | None,
    x: Tensor,
    momentum: float | None,
    channel_dim: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The observed range after batch ``x``. ``momentum`` None: the extremes of every value seen (a PTQ
    calibration's range, as torch.ao's ``MinMaxObserver``: the same whatever the order of the batches, and no
    calibration value lies outside it); a number: :func:`ema_minmax` with that update weight (QAT's warm-up)."""
    return range_step(running, channel_minmax(x, channel_dim), momentum)


def range_step(running: tuple[Tensor, Tensor] | None, current: tuple[Tensor, Tensor],
               momentum: float | None) -> tuple[Tensor, Tensor]:
    """:func:`running_minmax` from the batch's (min, max) ``current``, already taken."""
    if momentum is not None:
        return ema_step(running, current, momentum)
    cur_min, cur_max = current
    if running is None:
        return cur_min, cur_max
    return torch.minimum(running[0], cur_min), torch.maximum(running[1], cur_max)


def round_ste(x: Tensor) -> Tensor:
    """``torch.round`` (half to even) whose gradient is the identity (straight through)."""
    return x + (torch.round(x) - x).detach()


def quantize_constant(value: Tensor, bits: int | tuple[int, int], scale: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
    """A float constant that enters an integer op (a cls token, a position embedding, a per-channel
    parameter): its integers (a float tensor holding them, straight-through gradient) on ``scale``, or with
    ``scale`` None on the symmetric per-tensor grid over its own range, and that scale. Computed in float32
    whatever the model's type, so that the FX lowering and the Brevitas layers get the same integers."""
    value = value.float()
    if scale is None:
        scale = symmetric_scale(*channel_minmax(value), bits)
    scale = torch.as_tensor(scale, dtype=torch.float32)
    return quantize(value, scale, bits), scale


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


# Clipping ratios tried by the MSE search of narrow weights: 1.00, 0.99, ..., 0.41 of each channel's max |w|.
CLIP_RATIOS = tuple(1.0 - 0.01 * k for k in range(60))


def weight_scale(w: Tensor, bits: int, input_energy: Tensor | None = None) -> Tensor:
    """Per-output-channel symmetric scale of a weight (rows: output channels), computed in ``w``'s dtype.

    At 8 bits and above: min-max, ``max|w| / (2**(bits-1) - 1)`` (Brevitas' ``Int8WeightPerChannelFloat`` and
    torch.ao's per-channel observer: the front ends then agree to the integer). Below 8 bits the few levels
    make clipping pay: each channel takes the scale of the ratio in :data:`CLIP_RATIOS` (times its max |w|)
    that minimises its squared quantization error (the MSE search of Brevitas' ``MSE`` scaling and of
    GPTQ / AWQ's clip search; ties keep the larger ratio). ``input_energy``: the mean square of each input
    channel (one per column) weighs the error, which is then the expected squared error of the layer's output
    from the weight error of each column, its inputs taken as uncorrelated (activation-aware)."""
    w = w.detach().flatten(1)
    lo, hi = channel_minmax(w, 0)
    full = symmetric_scale(lo, hi, bits)
    if bits >= 8:
        return full
    best, best_err = full, None
    for ratio in CLIP_RATIOS:
        scale = full * ratio
        err = (torch.clamp(torch.round(w / scale[:, None]), *int_range(bits)) * scale[:, None] - w) ** 2
        err = (err if input_energy is None else err * input_energy).sum(1)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best, best_err = torch.where(better, scale, best), torch.where(better, err, best_err)
    return best


def pack_int4(x: Tensor) -> Tensor:
    """Integers in [-8, 7] (any shape) packed two a byte (uint8, flattened): element 2i in the low nibble,
    2i + 1 in the high one; an odd count is padded with a 0. :func:`unpack_int4` inverts it."""
    flat = x.reshape(-1).to(torch.int16)
    if flat.numel() and (int(flat.amin()) < -8 or int(flat.amax()) > 7):
        raise ValueError(f"pack_int4 takes integers in [-8, 7], got [{int(flat.amin())}, {int(flat.amax())}]")
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    nibbles = torch.bitwise_and(flat, 15)  # two's complement low nibble
    return (nibbles[0::2] + nibbles[1::2] * 16).to(torch.uint8)


def unpack_int4(packed: Tensor, numel: int) -> Tensor:
    """The first ``numel`` int8 integers of a :func:`pack_int4` buffer (sign-extended nibbles)."""
    wide = packed.to(torch.int16)
    pairs = torch.stack([torch.bitwise_and(wide, 15), torch.bitwise_right_shift(wide, 4)], dim=-1).reshape(-1)
    return (torch.bitwise_xor(pairs, 8) - 8)[:numel].to(torch.int8)

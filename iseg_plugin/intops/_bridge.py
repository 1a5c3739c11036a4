"""Primitives shared by every integer operator, and the bridge that lets QAT call them.

Every operator in :mod:`iseg_plugin.intops` is written once, over int64 tensors. The bridge
:func:`run_integer` lets the same function serve quantization-aware training, where tensors are
floats that hold integers: it casts them to int64 (exact, they hold integers), runs the integer
function without autograd, casts the result back, and attaches a straight-through gradient: the
gradient of the float operation the integer one approximates (for a plain floor or round this is
the classic identity STE). The integers produced in training and in deployment are therefore the
same by construction, and a test checks it.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

INT64 = torch.int64

# Reciprocal precision used by every integer division of the form num / den (num <= den):
# F = floor(2**DIV_BITS / den) keeps >= 20 significant bits for den < 2**42 and num * F <= 2**62.
DIV_BITS = 62


def as_int64(x: Tensor) -> Tensor:
    """Widen an integer tensor to int64 (the width every operator computes in)."""
    if x.dtype.is_floating_point or x.dtype.is_complex:
        raise TypeError(f"expected an integer tensor, got {x.dtype}")
    return x.to(INT64)


def pow2(shift: Tensor | int) -> Tensor | int:
    """2**shift for a non-negative int or int64 tensor of shifts."""
    if isinstance(shift, Tensor):
        return torch.bitwise_left_shift(torch.ones_like(shift), shift)
    return 1 << shift


def round_shift(x: Tensor, shift: Tensor | int) -> Tensor:
    """round(x / 2**shift), ties rounded up (towards +inf): (x + 2**(shift-1)) >> shift.

    The arithmetic right shift floors, so this is the hardware rounding of
    gemmlowp's ``RoundingDivideByPOT`` with ties towards +inf. ``shift`` may be 0.
    """
    half = torch.bitwise_right_shift(pow2(shift), 1) if isinstance(shift, Tensor) else (1 << shift) >> 1
    return torch.bitwise_right_shift(x + half, shift)


def bit_length(x: Tensor) -> Tensor:
    """Number of bits of each non-negative int64 value (0 for 0), by a 6-step binary search."""
    x = as_int64(x)
    n = torch.zeros_like(x)
    rest = x.clone()
    for step in (32, 16, 8, 4, 2, 1):
        big = torch.bitwise_right_shift(rest, step) > 0
        n = n + big.to(INT64) * step
        rest = torch.where(big, torch.bitwise_right_shift(rest, step), rest)
    return n + (rest > 0).to(INT64)


def divide(num: Tensor, den: Tensor, out_frac_bits: int) -> Tensor:
    """round(num / den * 2**out_frac_bits) for 0 <= num <= den, den >= 1, den < 2**42.

    Integer division through one reciprocal per denominator, as I-ViT's IntDiv does with
    2**31 - 1, but with DIV_BITS = 62 so the reciprocal keeps >= 20 bits even for large sums.
    The result lies in [0, 2**out_frac_bits].
    """
    # a scalar numerator, broadcast (a full-size one would be folded into a graph constant on export)
    recip = torch.div(torch.tensor(1 << DIV_BITS, dtype=INT64), den, rounding_mode="floor")
    shift = DIV_BITS - out_frac_bits
    return (num * recip).add_(1 << (shift - 1)).bitwise_right_shift_(shift)  # round half up, in place


def run_integer(
    int_fn: Callable[..., Tensor],
    inputs: tuple[Tensor, ...],
    surrogate: Callable[..., Tensor],
    *args,
    **kwargs,
) -> Tensor:
    """Run ``int_fn(*inputs, *args, **kwargs)`` on integer or float-holding-integer tensors.

    * integer first input (deployment): ``int_fn`` runs on int64 (further inputs that are floats
      holding integers, such as quantized parameters, are cast too) and returns int64;
    * float first input (QAT): every input must hold integers. They are cast to int64, ``int_fn`` runs
      without autograd, and the result comes back in the first input's float dtype, with the
      gradient of ``surrogate(*inputs)``, the float function the integer one approximates, in
      the same integer units (straight-through estimator).

    A float result is exact whenever the integers fit the float's mantissa (2**24 for float32,
    2**53 for float64); every operator states its output range.
    """
    first = inputs[0]
    if not first.dtype.is_floating_point:
        return int_fn(*(t.to(INT64) for t in inputs), *args, **kwargs)
    with torch.no_grad():
        out = int_fn(*(t.to(INT64) for t in inputs), *args, **kwargs).to(first.dtype)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        approx = surrogate(*inputs)
        out = approx + (out - approx).detach()
    return out

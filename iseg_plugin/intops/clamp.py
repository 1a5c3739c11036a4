"""Integer clamp, ReLU and ReLU6: exact on the quantization grid.

A clamp of ``x * S + ...`` to ``[low, high]`` (real values) followed by quantization on the same grid equals the
clamp of the integers at the quantized bounds, because quantization is monotone and maps ``x * S`` back to ``x``:
``quantize(clamp(x S, lo, hi)) = clamp(x, round(lo / S) + z, round(hi / S) + z)`` (zero point ``z``; bounds
outside the grid leave that side unclamped). No rounding happens at run time: the output has the input's scale,
zero point and width, and the float op on the dequantized input, requantized, gives the same integers (tested).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._bridge import as_int64, run_integer


def clamp_bounds(scale: float, low: float | None = None, high: float | None = None,
                 zero_point: int = 0) -> tuple[int | None, int | None]:
    """The integer bounds of a clamp to ``[low, high]`` (real values; None: unbounded) for input scale ``scale``
    and zero point: ``round(bound / scale) + zero_point`` (round half to even, as ``torch.round`` quantizes)."""
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if low is not None and high is not None and low > high:
        raise ValueError(f"low ({low}) must be <= high ({high})")

    def grid(v):
        if v is None:
            return None
        if not math.isfinite(v):
            raise ValueError(f"clamp bounds must be finite or None, got {v}")
        return int(torch.round(torch.tensor(float(v) / float(scale), dtype=torch.float64))) + int(zero_point)

    return grid(low), grid(high)


def _clamp_int(x: Tensor, low: int | None, high: int | None) -> Tensor:
    return as_int64(x).clamp(low, high)


def int_clamp(x: Tensor, low: int | None, high: int | None) -> Tensor:
    """``clamp(x, low, high)`` on integers (bounds from :func:`clamp_bounds`; None: that side open).

    * input: integers of any width; output: int64 (integer path) with the input's scale and zero point, values in
      ``[low, high]`` intersected with the input's range (never wider than the input);
    * exact: no rounding. QAT: the float clamp's gradient (1 inside, 0 outside).
    """
    if low is None and high is None:
        raise ValueError("int_clamp needs at least one bound")

    def surrogate(xf: Tensor) -> Tensor:
        return xf.clamp(low, high)

    return run_integer(_clamp_int, (x,), surrogate, low, high)


def relu(x: Tensor, zero_point: int = 0) -> Tensor:
    """Integer ReLU: ``max(x, zero_point)`` (the integer of real 0). Exact; same scale and width as ``x``."""
    return int_clamp(x, int(zero_point), None)


def relu6(x: Tensor, scale: float, zero_point: int = 0) -> Tensor:
    """Integer ReLU6: ``clamp(x, z, round(6 / S) + z)``. Exact on the grid (module docstring)."""
    low, high = clamp_bounds(scale, 0.0, 6.0, zero_point)
    return int_clamp(x, low, high)


__all__ = ["clamp_bounds", "int_clamp", "relu", "relu6"]

"""Integer sigmoid and the activations built on it: quick-GELU ``x * sigmoid(1.702 x)``, SiLU ``x * sigmoid(x)``,
hardsigmoid and hardswish.

**Sigmoid.** ``sigmoid(z) = 1 / (1 + e**-|z|)`` for ``z >= 0`` and ``1 - sigmoid(|z|)`` below, so the only
exponential is ``e**-|z|`` in ``(0, 1]``: the bit-exp exponential of :mod:`.exp` (a dyadic multiply turns the
input into a base-2 exponent with 12 fraction bits, exact log2 e; ``2**-q`` by a right shift and ``2**u`` by a
quadratic exact at both ends), then one integer division:

* ``E = bitexp(-|x|)`` with ``E / 2**(12 + k_inter) ~ e**(-|x| * S * alpha)``, ``2**12 <= E <= 2**(12 + k_inter)``
  (the exponent is clamped at ``-k_inter``, i.e. for ``|z| >= k_inter ln 2``: 10.4 for k_inter = 15);
* ``p = round(E / (2**(12 + k_inter) + E) * 2**(k_out - 1))`` = ``sigmoid(-|z|)`` in units of ``2**-(k_out - 1)``
  (``divide``: one reciprocal, round half up), and ``sigmoid(z) = 2**(k_out - 1) - p`` for ``z >= 0``, ``p``
  below: exactly symmetric, ``sigmoid(0) = 2**(k_out - 2)``.

Output: ``[0, 2**(k_out - 1)]`` with scale ``2**-(k_out - 1)``, declared unsigned k_out bits like the softmax
probabilities (for k_out = k_inter + 1 = 16 the clamp keeps ``p >= 1``: the output stays in ``[1, 2**15 - 1]``).
Intermediates: ``E <= 2**27`` and ``den <= 2**28`` for k_inter = 15 (int64; int32 would do). Error (measured,
``tests/test_intops_sigmoid.py`` and ``docs/op_fidelity.md``): the quadratic's 0.38 % relative error of ``2**u``
moves sigmoid by at most ``sigmoid (1 - sigmoid) * 0.0038 <= 0.001``; with the output's rounding, max abs error
about ``1e-3`` over the whole INT16 input range, for any input scale.

**x * sigmoid(alpha x)** (quick-GELU alpha = 1.702, SiLU alpha = 1): ``x * sigmoid`` with the sigmoid above
(alpha folded into the exponent's dyadic multiplier, exact, instead of I-ViT's 1.6875 shift-add); output
``x * s``, scale ``S * 2**-(k_out - 1)``, as the GELUs of :mod:`.gelu` (k_out = 8 for INT8 input: ``|out| <= 2**14``,
INT16; k_out = 16 for INT16 input: ``|out| <= 2**30``, INT32).

**Hardsigmoid / hardswish** (``relu6(x + 3) / 6``, ``x * relu6(x + 3) / 6``): ``h = clamp(round(x * S / 6 *
2**(k_out-1)) + 2**(k_out-2), 0, 2**(k_out-1))`` by one dyadic multiply (no rounding of 3 / S: the breakpoints
are exact in real units), then ``x * h``. Error: the rounding of h, at most half an output unit
(``2**-k_out``) of hardsigmoid, times ``|x|`` for hardswish.

Every function takes integer tensors (any width; int64 out) or floats holding integers (QAT: same integers, the
float op's gradient, :func:`._bridge.run_integer`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._bridge import as_int64, divide, run_integer
from .dyadic import Dyadic, dyadic_from_ratio, requantize
from .exp import BITEXP_FRAC, LOG2E, _bit_exp_int, _bit_exp_table, _through_table

QUICK_GELU_ALPHA = 1.702
K_INTER_SIGMOID = 15


class SigmoidParams(NamedTuple):
    """Integer constants of the sigmoid of ``alpha * x * S`` for one input scale S."""

    exponent: Dyadic  # S * alpha * log2 e * 2**12: input integers -> base-2 exponent with 12 fraction bits
    unit: float  # input integers per real unit of alpha * x (1 / (S alpha)): the QAT gradient only


def sigmoid_params(scale: float, alpha: float = 1.0) -> SigmoidParams:
    """Conversion-time constants of ``sigmoid(alpha * x * S)`` (alpha = 1.702: quick-GELU; 1: sigmoid, SiLU)."""
    if not scale > 0 or not alpha > 0:
        raise ValueError(f"scale and alpha must be > 0, got {scale}, {alpha}")
    ratio = float(scale) * float(alpha) * LOG2E * 2**BITEXP_FRAC
    return SigmoidParams(dyadic_from_ratio(ratio), 1.0 / (float(scale) * float(alpha)))


def sigmoid_params_from(exponent: Dyadic, x: Tensor) -> SigmoidParams:
    """The constants as a deployed module stores them (the exponent's dyadic alone) for input ``x``: ``unit``, which
    only the QAT gradient reads, is derived from it for a float ``x`` (integers: no float op at all)."""
    unit = float(LOG2E * 2**BITEXP_FRAC / exponent.ratio()) if x.dtype.is_floating_point else 0.0
    return SigmoidParams(exponent, unit)


def _sigmoid_int(x: Tensor, m: Tensor, e: Tensor, k_out: int, k_inter: int, span: int | None) -> Tensor:
    x = as_int64(x)
    neg = -x.abs()  # <= 0
    if span is not None:  # an int8 / int16 input: read e**-|z| from the table over its range
        ex = _through_table(_bit_exp_table(int(m), int(e), k_inter, span), neg)
    else:
        ex = _bit_exp_int(neg, m, e, k_inter)
    one = 1 << (BITEXP_FRAC + k_inter)  # e**0
    low = divide(ex, ex + one, k_out - 1)  # sigmoid(-|z|), in [1, 2**(k_out-2)]
    return torch.where(x >= 0, (1 << (k_out - 1)) - low, low)


def _abs_span(x: Tensor) -> int | None:
    """How far below 0 ``-|x|`` can go for ``x``'s dtype (int8 / int16: a table; else None: computed directly)."""
    if x.dtype in (torch.int8, torch.int16):
        return (1 << (torch.iinfo(x.dtype).bits - 1))
    return None


def sigmoid(x: Tensor, params: SigmoidParams, k_out: int = 16, k_inter: int = K_INTER_SIGMOID) -> Tensor:
    """Integer sigmoid of ``alpha * x * S`` (module docstring): ``params = sigmoid_params(S, alpha)``.

    * input: integers of scale S, any range (``|x| < 2**31``);
    * output: ``[0, 2**(k_out-1)]``, scale ``2**-(k_out-1)`` (unsigned k_out bits); ``sigmoid(0) = 2**(k_out-2)``,
      ``sigmoid(-x) = 2**(k_out-1) - sigmoid(x)`` exactly;
    * rounding: the exponent's dyadic multiply and the division round half up;
    * intermediates: ``<= 2**(13 + k_inter)`` (int64); requires ``k_out <= k_inter + 1``.
    """
    if k_out > k_inter + 1:
        raise ValueError(f"k_out ({k_out}) must be <= k_inter + 1 ({k_inter + 1})")
    m, e = params.exponent

    def surrogate(xf: Tensor) -> Tensor:
        return torch.sigmoid(xf / params.unit) * 2.0 ** (k_out - 1)

    return run_integer(_sigmoid_int, (x,), surrogate, m, e, k_out, k_inter, _abs_span(x))


def _x_sigmoid_int(x: Tensor, m: Tensor, e: Tensor, k_out: int, k_inter: int, span: int | None) -> Tensor:
    x = as_int64(x)
    return x * _sigmoid_int(x, m, e, k_out, k_inter, span)


def x_sigmoid(x: Tensor, params: SigmoidParams, k_out: int = 8, k_inter: int = K_INTER_SIGMOID) -> Tensor:
    """``x * sigmoid(alpha x)`` on integers: quick-GELU (alpha 1.702), SiLU / swish (alpha 1).

    * input: integers of scale S; ``params = sigmoid_params(S, alpha)``;
    * output: ``x * s`` with s the integer sigmoid in ``[0, 2**(k_out-1)]``: scale ``S * 2**-(k_out-1)``;
      ``|out| <= |x| * 2**(k_out-1)`` (INT8 in, k_out = 8: INT16; INT16 in, k_out = 16: INT32);
    * element-wise, no row reduction; rounding and intermediates as :func:`sigmoid`.
    """
    if k_out > k_inter + 1:
        raise ValueError(f"k_out ({k_out}) must be <= k_inter + 1 ({k_inter + 1})")
    m, e = params.exponent
    alpha_unit = params.unit  # integers per real unit of alpha x

    def surrogate(xf: Tensor) -> Tensor:
        return xf * torch.sigmoid(xf / alpha_unit) * 2.0 ** (k_out - 1)

    return run_integer(_x_sigmoid_int, (x,), surrogate, m, e, k_out, k_inter, _abs_span(x))


def quick_gelu(x: Tensor, scale: float, k_out: int = 8) -> Tensor:
    """Quick-GELU ``x * sigmoid(1.702 x)`` (CLIP, OWL-ViT, CLIPSeg) of integers of scale ``scale`` (see
    :func:`x_sigmoid`; output scale ``scale * 2**-(k_out-1)``). The constants depend on ``scale`` only: a
    converter builds them once with ``sigmoid_params(scale, 1.702)`` and calls :func:`x_sigmoid`."""
    return x_sigmoid(x, sigmoid_params(scale, QUICK_GELU_ALPHA), k_out)


def silu(x: Tensor, scale: float, k_out: int = 8) -> Tensor:
    """SiLU / swish ``x * sigmoid(x)`` of integers of scale ``scale`` (see :func:`x_sigmoid`)."""
    return x_sigmoid(x, sigmoid_params(scale, 1.0), k_out)


# ---------------------------------------------------------------------------------------------------------------
# hardsigmoid / hardswish: relu6(x + 3) / 6


class HardParams(NamedTuple):
    """Integer constants of hardsigmoid ``relu6(x S + 3) / 6`` for one input scale S."""

    slope: Dyadic  # S / 6 * 2**(k_out-1): input integers -> hardsigmoid units, minus the offset
    k_out: int
    unit: float  # 1 / S (QAT gradient only)


def hard_params(scale: float, k_out: int = 8) -> HardParams:
    """Conversion-time constants of hardsigmoid / hardswish for input scale S (output units ``2**-(k_out-1)``)."""
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    return HardParams(dyadic_from_ratio(float(scale) / 6.0 * 2.0 ** (k_out - 1)), k_out, 1.0 / float(scale))


def hard_params_from(slope: Dyadic, k_out: int, x: Tensor) -> HardParams:
    """The constants as a deployed module stores them for input ``x`` (``unit``, for the QAT gradient only, derived
    from the slope for a float ``x``)."""
    unit = float(2.0 ** (k_out - 1) / (6.0 * slope.ratio())) if x.dtype.is_floating_point else 0.0
    return HardParams(slope, int(k_out), unit)


def _hardsigmoid_int(x: Tensor, m: Tensor, e: Tensor, k_out: int) -> Tensor:
    h = requantize(as_int64(x), Dyadic(m, e), bits=None) + (1 << (k_out - 2))  # x S / 6 + 1/2
    return h.clamp(0, 1 << (k_out - 1))


def hardsigmoid(x: Tensor, params: HardParams) -> Tensor:
    """Integer hardsigmoid ``relu6(x S + 3) / 6``: output ``[0, 2**(k_out-1)]``, scale ``2**-(k_out-1)`` (unsigned
    k_out bits); one dyadic multiply (round half up) and a clamp; error at most half an output unit; any
    ``|x| < 2**31``."""
    m, e = params.slope
    k_out = params.k_out

    def surrogate(xf: Tensor) -> Tensor:
        return F.hardsigmoid(xf / params.unit) * 2.0 ** (k_out - 1)

    return run_integer(_hardsigmoid_int, (x,), surrogate, m, e, k_out)


def _hardswish_int(x: Tensor, m: Tensor, e: Tensor, k_out: int) -> Tensor:
    x = as_int64(x)
    return x * _hardsigmoid_int(x, m, e, k_out)


def hardswish(x: Tensor, params: HardParams) -> Tensor:
    """Integer hardswish ``x * relu6(x S + 3) / 6``: ``x * h`` with h of :func:`hardsigmoid`; output scale
    ``S * 2**-(k_out-1)``, ``|out| <= |x| * 2**(k_out-1)``; error at most ``|x| / 2`` output units (h's rounding)."""
    m, e = params.slope
    k_out = params.k_out

    def surrogate(xf: Tensor) -> Tensor:
        return F.hardswish(xf / params.unit) * params.unit * 2.0 ** (k_out - 1)

    return run_integer(_hardswish_int, (x,), surrogate, m, e, k_out)


def sigmoid_reference(z: Tensor) -> Tensor:
    """The float op (float64), for tests and the fidelity report."""
    return torch.sigmoid(z.double())


def quick_gelu_reference(z: Tensor) -> Tensor:
    z = z.double()
    return z * torch.sigmoid(QUICK_GELU_ALPHA * z)


__all__ = ["QUICK_GELU_ALPHA", "SigmoidParams", "sigmoid_params", "sigmoid", "x_sigmoid", "quick_gelu", "silu",
           "HardParams", "hard_params", "hardsigmoid", "hardswish"]

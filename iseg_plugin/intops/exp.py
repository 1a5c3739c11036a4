"""Integer exponentials and softmaxes: I-ViT's ShiftExp / Shiftmax and IPTQ-ViT-style bit-exp softmax.

Both softmaxes return probabilities in ``[0, 2**(k_out-1)]`` with scale ``2**-(k_out-1)``. A
one-hot row gives exactly ``2**(k_out-1)`` (128 for k_out=8, 32768 for k_out=16), one more than a
signed k_out-bit integer holds (reference §4 step 8): the output is therefore declared as an
*unsigned* k_out-bit integer (uint8 / uint16), which holds it. This is also the operand type of
onnxruntime's fast u8 x s8 integer GEMM for attn @ V.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from ._bridge import as_int64, divide, round_shift, run_integer
from .dyadic import Dyadic, dyadic_from_ratio, requantize

LOG2E = math.log2(math.e)


def exp_i0(scale: float) -> int:
    """I-ViT's I0 = round(1/S) for an input scale S (at least 1): the integer for one real unit."""
    return max(1, round(1.0 / float(scale)))


def mul_log2e(x: Tensor) -> Tensor:
    """x * 1.0111b (= 1.4375 ~ log2 e) by shift-add: x + (x >> 1) - (x >> 4) (I-ViT eq. 9)."""
    return x + torch.bitwise_right_shift(x, 1) - torch.bitwise_right_shift(x, 4)


def _shift_exp_int(x: Tensor, i0: int, k_inter: int) -> Tensor:
    p = mul_log2e(as_int64(x))  # base-2 exponent in units of 1/i0
    p = p.clamp_min(-k_inter * i0)  # exponent >= -k_inter (I-ViT eq. 10)
    q = torch.div(p, -i0, rounding_mode="floor")  # integer part, 0 <= q <= k_inter
    r = p + q * i0  # fractional part, -i0 < r <= 0
    b = torch.bitwise_right_shift(r, 1) + i0  # 2**(r/i0) ~ 1 + r/(2 i0), in units of 1/i0
    return torch.bitwise_left_shift(b, k_inter - q)


# Both exponentials clamp their exponent, so below a saturation point their output is constant:
# inputs are clamped there and read from a table of the integer function over [saturation, 0] (one
# gather instead of ~20 element-wise passes, in PyTorch and in the exported ONNX graph). The table is
# built by the same function, so the integers are identical (tested). It depends on the operator's
# constants only, never on the data: it is built once, outside any trace, and a traced graph holds it
# as a constant. Wider ranges are computed directly.
TABLE_MAX = 1 << 17


@contextlib.contextmanager
def _untraced():
    """Build a table eagerly even while a model is being traced (it is a constant of the graph).
    torch has no public switch for this; its tracer reads this state at every op."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


def _saturation(exponent: Callable[[Tensor], Tensor], clamp: int) -> int:
    """The largest x in [-2**31, 0] with ``exponent(x) <= clamp`` (``exponent`` non-decreasing), by
    bisection: the exponential is the same for every input at or below it. -2**31 if none is above."""
    lo, hi = -(1 << 31), 0
    if int(exponent(torch.tensor(hi))) <= clamp:
        return hi
    if int(exponent(torch.tensor(lo))) > clamp:
        return lo
    while hi - lo > 1:  # exponent(lo) <= clamp < exponent(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if int(exponent(torch.tensor(mid))) <= clamp else (lo, mid)
    return lo


class _Table(NamedTuple):
    int_fn: Callable[[Tensor], Tensor]  # the integer function the table holds
    low: int  # the saturation point, or -span if the inputs cannot go below it (see row_span)
    values: Tensor | None  # int_fn over [low, 0]; None if that range is too wide
    saturates: bool  # whether inputs below low can occur (and must be clamped to it)


def _table(int_fn: Callable[[Tensor], Tensor], exponent: Callable[[Tensor], Tensor], clamp: int,
           span: int | None) -> _Table:
    with _untraced():
        saturation = _saturation(exponent, clamp)
        low = saturation if span is None else max(saturation, -span)
        values = None if -low >= TABLE_MAX else int_fn(torch.arange(low, 1, dtype=torch.int64))
        return _Table(int_fn, low, values, low == saturation)


def row_span(x: Tensor) -> int | None:
    """How far below its row max an input of ``x``'s dtype can lie (None: unknown, e.g. a float
    holding integers in QAT, or int64)."""
    if x.dtype in (torch.int8, torch.int16, torch.int32):
        return (1 << torch.iinfo(x.dtype).bits) - 1
    return None


def _through_table(table: _Table, x: Tensor) -> Tensor:
    """``table.int_fn(x)`` for ``x <= 0``, read from the table where there is one."""
    if table.values is None:
        return table.int_fn(x)
    return table.values[(x.clamp_min(table.low) if table.saturates else x) - table.low]


@functools.lru_cache(maxsize=None)
def _shift_exp_table(i0: int, k_inter: int, span: int | None) -> _Table:
    return _table(lambda t: _shift_exp_int(t, i0, k_inter), mul_log2e, -k_inter * i0, span)


def shift_exp_lookup(x: Tensor, i0: int, k_inter: int, span: int | None = None) -> Tensor:
    """``_shift_exp_int`` of ``x <= 0`` (and ``x >= -span`` if given), through a table (see above)."""
    return _through_table(_shift_exp_table(i0, k_inter, span), as_int64(x))


def shiftmax_table(i0: int, span: int | None, k_inter: int = 15) -> _Table:
    """Shiftmax's exponential over ``[table.low, 0]`` for inputs whose rows span at most ``span`` (the fused
    kernel reads it; ``table.values`` is None where the range is too wide for a table)."""
    return _shift_exp_table(i0, k_inter, span)


def shift_exp(x: Tensor, i0: int, k_inter: int) -> Tensor:
    """ShiftExp (I-ViT): e**(x*S) for integers ``x <= 0`` with ``i0 = round(1/S)``.

    * input: integers ``x <= 0`` (scale S, represented by ``i0 >= 1``);
    * output: ``e`` with ``e / (i0 * 2**k_inter) ~= exp(x / i0)``; ``0 < e <= i0 * 2**k_inter``
      (never 0: the exponent is clamped at ``-k_inter`` before the shift);
    * method: base 2 with log2 e ~ 1.4375 by shifts, split into integer part q (a left shift by
      ``k_inter - q >= 0``) and fraction r, ``2**(r/i0) ~ 1 + r/(2 i0)`` with r floored by ``>> 1``
      (TVM's rule; I-ViT's PyTorch keeps the half LSB);
    * error: the linear fraction is off by up to 4.3 % and 1.4375 vs 1.4427 by 0.36 % in the
      exponent; inputs below ``-k_inter / (1.4375 S)`` are clamped.
    """
    if i0 < 1:
        raise ValueError(f"i0 must be >= 1, got {i0}")
    return run_integer(
        _shift_exp_int, (x,), lambda xf: torch.exp(xf / i0) * (i0 * 2.0**k_inter), i0, k_inter
    )


def _shiftmax_int(x: Tensor, i0: int, k_out: int, k_inter: int, dim: int, span: int | None) -> Tensor:
    x = as_int64(x)
    e = shift_exp_lookup(x - x.amax(dim, keepdim=True), i0, k_inter, span)
    return divide(e, e.sum(dim, keepdim=True), k_out - 1)


def shiftmax(x: Tensor, i0: int, k_out: int = 16, k_inter: int = 15, dim: int = -1) -> Tensor:
    """Shiftmax (I-ViT): integer softmax of ``x * S`` along ``dim``, ``i0 = round(1/S)``.

    * input: integers (INT16 attention logits in the plugin's model), any range; row max subtracted first
      (an int8 / int16 tensor's exponentials are read from a table over its range, see ``row_span``);
    * output: ``[0, 2**(k_out-1)]``, scale ``2**-(k_out-1)``, unsigned k_out bits (module docstring);
    * method: ShiftExp with clamp ``k_inter`` (15 in I-ViT's PyTorch), then one integer division
      per row, ``round(e * floor(2**62 / sum) / 2**(62 - k_out + 1))`` (I-ViT divides 2**31 - 1,
      which keeps few bits once the row sum is large);
    * intermediates: ``e <= i0 * 2**k_inter``, row sum ``<= n * i0 * 2**k_inter`` (int64);
    * error: dominated by ShiftExp's linear fraction (see ``docs/op_fidelity.md``).
    """
    if i0 < 1:
        raise ValueError(f"i0 must be >= 1, got {i0}")
    return run_integer(
        _shiftmax_int,
        (x,),
        lambda xf: torch.softmax(xf / i0, dim) * 2.0 ** (k_out - 1),
        i0,
        k_out,
        k_inter,
        dim,
        row_span(x),
    )


# Bit-exp: the base-2 exponent carried with BITEXP_FRAC fraction bits, and 2**u on [0, 1) by the
# quadratic 1 + u (C1 + C2 u) with C1 + C2 = 1 (exact at both ends, max error 0.0038, vs 0.043
# for ShiftExp's 1 + u/2). Coefficients are the minimax fit under that constraint.
BITEXP_FRAC = 12
_BITEXP_C1 = round(0.65571 * 2**BITEXP_FRAC)
_BITEXP_C2 = (1 << BITEXP_FRAC) - _BITEXP_C1


def bit_exp_params(scale: float) -> Dyadic:
    """The multiplier turning an input of scale S into a base-2 exponent with 12 fraction bits."""
    return dyadic_from_ratio(float(scale) * LOG2E * 2**BITEXP_FRAC)


def _bit_exp_mantissa(r: Tensor) -> Tensor:
    """2**u on [0, 1) for u = r / 2**FRAC, in units of 2**-FRAC: in [2**FRAC, 2**(FRAC+1)]."""
    return (1 << BITEXP_FRAC) + round_shift(r * (_BITEXP_C1 + round_shift(_BITEXP_C2 * r, BITEXP_FRAC)), BITEXP_FRAC)


def _bit_exp_int(d: Tensor, m: Tensor, e: Tensor, k_inter: int) -> Tensor:
    p = requantize(d, Dyadic(m, e), bits=None)  # exponent * 2**FRAC, <= 0
    p = p.clamp_min(-k_inter << BITEXP_FRAC)
    q = -torch.bitwise_right_shift(p, BITEXP_FRAC)  # 0 <= q <= k_inter
    r = torch.bitwise_and(p, (1 << BITEXP_FRAC) - 1)  # fraction u = r / 2**FRAC in [0, 1)
    mant = torch.bitwise_left_shift(_bit_exp_mantissa(r), k_inter)
    return torch.bitwise_right_shift(mant, q)  # no bits lost: q <= k_inter


@functools.lru_cache(maxsize=None)
def _bit_exp_table(m: int, e: int, k_inter: int, span: int | None) -> _Table:
    dyadic = Dyadic(torch.tensor(m), torch.tensor(e))
    return _table(lambda d: _bit_exp_int(d, *dyadic, k_inter), lambda d: requantize(d, dyadic, bits=None),
                  -k_inter << BITEXP_FRAC, span)


def bit_exp_table(params: Dyadic, span: int | None, k_inter: int = 15) -> _Table:
    """Bit-exp softmax's exponential over ``[table.low, 0]`` (see :func:`shiftmax_table`)."""
    return _bit_exp_table(int(params.multiplier), int(params.shift), k_inter, span)


class BitExpForm(NamedTuple):
    """Bit-exp's exponential as a fused kernel computes it element by element, with no table (a table over an int16
    difference has 2**16 values: its gathers, not the arithmetic, were the softmax's cost): ``_bit_exp_int`` step by
    step, ``p = max(round_half_up(d * multiplier / 2**shift), low)``, ``q = -(p >> frac_bits)``, ``r = p & (2**frac_bits
    - 1)``, ``mant = 2**frac_bits + round_half_up(r (c1 + round_half_up(c2 r / 2**frac_bits)) / 2**frac_bits)``,
    ``e = (mant << k_inter) >> q``. Every step after the product fits int32 (the kernel checks)."""
    multiplier: int
    shift: int
    low: int  # the exponent's clamp, -k_inter * 2**frac_bits
    frac_bits: int
    c1: int
    c2: int
    k_inter: int


def bit_exp_form(params: Dyadic, k_inter: int = 15) -> BitExpForm:
    """Bit-exp softmax's exponential in the kernels' element-wise form (:class:`BitExpForm`)."""
    return BitExpForm(int(params.multiplier), int(params.shift), -k_inter << BITEXP_FRAC, BITEXP_FRAC, _BITEXP_C1,
                      _BITEXP_C2, k_inter)


def _bit_exp_softmax_int(x: Tensor, m: Tensor, e: Tensor, k_out: int, k_inter: int, dim: int,
                         span: int | None) -> Tensor:
    x = as_int64(x)
    ex = _through_table(_bit_exp_table(int(m), int(e), k_inter, span), x - x.amax(dim, keepdim=True))
    return divide(ex, ex.sum(dim, keepdim=True), k_out - 1)


def bit_exp_softmax(x: Tensor, params: Dyadic, k_out: int = 16, k_inter: int = 15, dim: int = -1) -> Tensor:
    """Bit-exp softmax (IPTQ-ViT's bit-shifting softmax, our reading): integer softmax along ``dim``.

    IPTQ-ViT publishes no formula or code for its "efficient bit-exp", so this is our version of
    the idea (a base-2 exponent whose precision does not depend on the input scale):

    * input: integers (scale S); ``params = bit_exp_params(S)``;
    * exponent ``(x - max) * S * log2 e`` by a dyadic multiply (exact log2 e, not 1.4375) with 12
      fraction bits, clamped at ``-k_inter``; ``2**-q`` by a right shift, ``2**u`` by the quadratic
      above; one integer division per row as in :func:`shiftmax`;
    * output: ``[0, 2**(k_out-1)]``, scale ``2**-(k_out-1)`` (unsigned k_out bits);
    * intermediates: ``ex <= 2**(13 + k_inter)``, row sum ``<= n * 2**(13 + k_inter)`` (int64).
    """
    def surrogate(xf: Tensor) -> Tensor:
        scale = float(params.ratio()) / (LOG2E * 2**BITEXP_FRAC)  # only on the float (QAT) path
        return torch.softmax(xf * scale, dim) * 2.0 ** (k_out - 1)

    return run_integer(
        _bit_exp_softmax_int,
        (x,),
        surrogate,
        params.multiplier,
        params.shift,
        k_out,
        k_inter,
        dim,
        row_span(x),
    )

"""Integer sigmoid, quick-GELU x * sigmoid(1.702 x), SiLU, hardsigmoid and hardswish (iseg_plugin.intops.sigmoid)."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from iseg_plugin import intops

INT16 = torch.arange(-32768, 32768)
SCALES = (1e-3, 1e-2, 0.05, 0.3)


def long_tailed(n=20000, seed=0):
    """Student-t (2 degrees of freedom) activations: most values near 0, a long tail of large ones."""
    g = torch.Generator().manual_seed(seed)
    t = torch.distributions.StudentT(2.0)
    torch.manual_seed(seed)
    return t.sample((n,)).double() * (1 + torch.rand(n, generator=g).double())


def quantize(x, bits=8):
    hi = (1 << (bits - 1)) - 1
    scale = float(x.abs().max()) / hi
    return torch.round(x / scale).clamp(-hi - 1, hi).long(), scale


def test_sigmoid_hand_cases():
    # S = ln 2: x * S * log2 e = x exactly (the dyadic multiplier is 2**30 / 2**18 = 4096 = 1 << 12)
    # x = 1: e**-z = 1/2 exactly (E = 2**26, one = 2**27): sigmoid(-ln 2) = round(2**15 / 3) = 10923 (10922.67, half up)
    # -> sigmoid(ln 2) = 32768 - 10923 = 21845; x = 2: E = 2**25, round(2**15 / 5) = 6554 -> 26214
    # x = 0: 2**15 / 2 = 16384 exactly; |x| huge: the exponent clamps at -15: E = 2**12, round(2**15 * 2**12 / (2**27 +
    # 2**12)) = 1 -> 1 and 32767
    params = intops.sigmoid_params(math.log(2))
    assert int(params.exponent.multiplier) == 1 << 30 and int(params.exponent.shift) == 18
    x = torch.tensor([-100000, -2, -1, 0, 1, 2, 100000])
    assert intops.sigmoid(x, params).tolist() == [1, 6554, 10923, 16384, 21845, 26214, 32767]
    # x * sigmoid: the same sigmoid times x (k_out = 16 here, so the same units)
    assert intops.x_sigmoid(x, params, k_out=16).tolist() == [v * s for v, s in zip(x.tolist(), [1, 6554, 10923, 16384, 21845, 26214, 32767])]
    # k_out = 8: sigmoid(ln 2) = 128 - round(128 / 3) = 128 - 43 = 85
    assert intops.sigmoid(torch.tensor([-1, 0, 1]), params, k_out=8).tolist() == [43, 64, 85]


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("alpha", [1.0, intops.QUICK_GELU_ALPHA])
def test_sigmoid_error_bound_over_the_whole_int16_range(scale, alpha):
    params = intops.sigmoid_params(scale, alpha)
    out = intops.sigmoid(INT16, params)
    ref = torch.sigmoid(INT16.double() * scale * alpha)
    err = out.double() / 2**15 - ref
    assert out.min() >= 0 and out.max() <= 1 << 15
    assert float(err.abs().max()) <= 1e-3  # measured 7.1e-4 .. 8.0e-4 (docs/op_fidelity.md)
    assert float(err.square().mean().sqrt()) <= 1.2e-4
    assert bool((out[1:] >= out[:-1]).all())  # monotone
    assert torch.equal(out[1:] + out[1:].flip(0), torch.full_like(out[1:], 1 << 15))  # sigmoid(-x) = 1 - sigmoid(x)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64, torch.float32, torch.float64])
def test_sigmoid_same_integers_for_every_input_type(dtype):
    """int8 / int16 read the exponential from a table, wider types compute it, floats holding integers (QAT) go
    through the bridge: the same integers."""
    info = torch.iinfo(dtype) if not dtype.is_floating_point else torch.iinfo(torch.int16)
    x = torch.arange(max(info.min, -32768), min(info.max, 32767) + 1)
    params = intops.sigmoid_params(0.01, 1.702)
    expected = intops.sigmoid(x.long(), params)
    got = intops.sigmoid(x.to(dtype), params)
    assert torch.equal(got.long(), expected)
    assert got.dtype == (dtype if dtype.is_floating_point else torch.int64)
    for k_out in (8, 16) if dtype != torch.float32 else (8,):  # (|out| <= 2**30 with k_out 16: beyond float32's 2**24)
        assert torch.equal(intops.x_sigmoid(x.to(dtype), params, k_out).long(), intops.x_sigmoid(x.long(), params, k_out))


@given(st.lists(st.integers(-(1 << 30), 1 << 30), min_size=1, max_size=64), st.floats(1e-5, 10.0), st.sampled_from([8, 12, 16]))
def test_sigmoid_any_range_stays_in_its_declared_width(values, scale, k_out):
    x = torch.tensor(values)
    out = intops.sigmoid(x, intops.sigmoid_params(scale), k_out=k_out)
    assert out.dtype == torch.int64 and (out >= 0).all() and (out <= 1 << (k_out - 1)).all()
    ref = torch.sigmoid(x.double() * scale)
    assert float((out.double() / 2 ** (k_out - 1) - ref).abs().max()) <= 1e-3 + 2.0 ** -k_out


def test_k_out_above_the_exponent_precision_is_refused():
    with pytest.raises(ValueError, match="k_out"):
        intops.sigmoid(torch.tensor([1]), intops.sigmoid_params(0.1), k_out=17)
    with pytest.raises(ValueError, match="> 0"):
        intops.sigmoid_params(0.0)


@pytest.mark.parametrize("alpha,name", [(intops.QUICK_GELU_ALPHA, "quick-GELU"), (1.0, "SiLU")])
def test_x_sigmoid_error_on_long_tailed_inputs(alpha, name):
    """INT8 input (per-tensor scale of a Student-t sample), k_out = 8 (INT16 output), as the GELUs: the error
    against the float op of the dequantized input is at most |x| S (2**-8 for the output's rounding + 1e-3 for the
    sigmoid) and the RMSE a small fraction of one input LSB."""
    real = long_tailed()
    x, scale = quantize(real)
    out = intops.x_sigmoid(x, intops.sigmoid_params(scale, alpha), k_out=8)
    assert out.abs().max() <= 128 * 128
    got = out.double() * scale / 128
    xd = x.double() * scale
    ref = xd * torch.sigmoid(alpha * xd)
    err = (got - ref).abs()
    assert bool((err <= xd.abs() * (2.0**-8 + 1e-3) + 1e-12).all()), name
    assert float(err.max()) <= 0.6 * scale  # measured ~0.5 S: the output grid's half step at |x| = 127
    assert float(err.square().mean().sqrt()) <= 0.05 * scale
    # with the input's quantization (what the model sees): dominated by the INT8 rounding of a long-tailed input
    full = (got - real * torch.sigmoid(alpha * real)).abs()
    assert float(full.max()) <= 1.1 * scale


def test_quick_gelu_and_silu_are_x_sigmoid_with_their_alpha():
    x = torch.arange(-128, 128)
    assert torch.equal(intops.quick_gelu(x, 0.05), intops.x_sigmoid(x, intops.sigmoid_params(0.05, 1.702)))
    assert torch.equal(intops.silu(x, 0.05), intops.x_sigmoid(x, intops.sigmoid_params(0.05, 1.0)))
    # quick-GELU is close to erf GELU (|difference| <= 0.021 in real units) and the integers follow it (+ the output's
    # half step, 0.0125 at |x| = 6.35)
    xd = x.double() * 0.05
    gelu = F.gelu(xd)
    assert float((intops.quick_gelu(x, 0.05).double() * 0.05 / 128 - gelu).abs().max()) <= 0.021 + 0.0125


def test_int16_input_with_16_bit_sigmoid_fits_int32():
    x = INT16
    out = intops.x_sigmoid(x, intops.sigmoid_params(0.002, 1.702), k_out=16)
    assert out.abs().max() <= 1 << 30
    ref = x.double() * 0.002 * torch.sigmoid(1.702 * x.double() * 0.002)
    err = (out.double() * 0.002 / 2**15 - ref).abs()
    assert float(err.max()) <= 1e-3 * 32768 * 0.002  # |x| S * 1e-3 at most


def test_qat_path_gives_the_integers_and_the_float_gradient():
    x = torch.arange(-128, 128).double().requires_grad_()
    params = intops.sigmoid_params(0.05, 1.702)
    out = intops.x_sigmoid(x, params)
    assert torch.equal(out.detach().long(), intops.x_sigmoid(x.detach().long(), params))
    out.sum().backward()
    xd = x.detach() * 0.05
    s = torch.sigmoid(1.702 * xd)
    expected = (s + 1.702 * xd * s * (1 - s)) * 128  # d/dx of x sigma(1.702 x) in integer units
    assert torch.allclose(x.grad, expected, rtol=1e-6)
    y = torch.tensor([-3.0, 0.0, 5.0], requires_grad=True)
    intops.sigmoid(y, params).sum().backward()
    assert torch.isfinite(y.grad).all() and (y.grad > 0).all()


def test_no_nan_or_inf_on_extreme_inputs():
    x = torch.tensor([-(2.0**31) + 1, -1e9, -1.0, 0.0, 1.0, 1e9, 2.0**31 - 1], dtype=torch.float64)
    for fn in (lambda t: intops.sigmoid(t, intops.sigmoid_params(1e-4)),
               lambda t: intops.x_sigmoid(t, intops.sigmoid_params(1e-4), k_out=8),
               lambda t: intops.hardswish(t, intops.hard_params(1e-4)),
               lambda t: intops.hardsigmoid(t, intops.hard_params(1e-4))):
        out = fn(x)
        assert torch.isfinite(out).all() and torch.equal(out.long(), fn(x.long()))


def test_hardsigmoid_and_hardswish_hand_cases():
    # S = 0.5: x = -6 is -3 (h = 0), 0 (h = 1/2 = 64 of 128), 6 is +3 (h = 1 = 128), x = 3 is 1.5: h = 0.75 = 96
    params = intops.hard_params(0.5, k_out=8)
    x = torch.tensor([-100, -6, -3, 0, 3, 6, 100])
    assert intops.hardsigmoid(x, params).tolist() == [0, 0, 32, 64, 96, 128, 128]
    assert intops.hardswish(x, params).tolist() == [0, 0, -96, 0, 288, 768, 12800]


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("k_out", [8, 16])
def test_hardswish_error_bound(scale, k_out):
    params = intops.hard_params(scale, k_out)
    x = INT16
    h = intops.hardsigmoid(x, params)
    assert h.min() >= 0 and h.max() <= 1 << (k_out - 1)
    h_err = (h.double() / 2 ** (k_out - 1) - F.hardsigmoid(x.double() * scale)).abs()
    assert float(h_err.max()) <= 2.0**-k_out * (1 + 1e-6)  # half an output unit
    out = intops.hardswish(x, params)
    err = (out.double() * scale / 2 ** (k_out - 1) - F.hardswish(x.double() * scale)).abs()
    assert bool((err <= x.double().abs() * scale * 2.0**-k_out * (1 + 1e-6) + 1e-12).all())
    xf = x.double().requires_grad_()
    assert torch.equal(intops.hardswish(xf, params).detach().long(), out)

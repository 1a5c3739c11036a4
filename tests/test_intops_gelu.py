import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from iseg_plugin import intops


def real_gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def quantize_rows(x):
    scale = float(x.abs().max()) / 127
    return torch.round(x / scale).clamp(-128, 127).long(), scale


def long_tailed_rows(n_rows=16, channels=3072, outlier=20.0, seed=0):
    """N(0, 1) activations with one outlier channel, as in ViT MLP hidden layers."""
    x = torch.randn(n_rows, channels, generator=torch.Generator().manual_seed(seed))
    x[:, 7] = outlier
    return x


def test_shift_gelu_hand_case():
    # i0 = 10 (S = 0.1), x = [-10, 0, 10] = [-1.0, 0.0, 1.0]
    # z = 1.6875 x by shifts = [-18, 0, 16]; m = 16
    # e2 = ShiftExp(-16): p = -23, q = 2, r = -3, b = -2 + 10 = 8 -> 8 << 21 = 16777216
    # x = 10: e1 = 10 << 23 = 83886080 -> sigma = round(128 * 5/6) = 107 -> 1070 (0.836, GELU 0.841)
    # x = -10: z - m = -34: p = -48, q = 4, r = -8, b = 6 -> 6 << 19; sigma = 20.2 -> 20 -> -200 (-0.156)
    x = torch.tensor([[-10, 0, 10]])
    assert intops.shift_gelu(x, 10).tolist() == [[-200, 0, 1070]]
    # with no extra fraction bits and a cap above the row max, lambda-ShiftGELU is ShiftGELU
    params = intops.LambdaGeluParams(i0=10, cap=60, frac_bits=0)
    assert intops.lambda_shift_gelu(x, params).tolist() == [[-200, 0, 1070]]
    # a cap of 5 (lambda = 0.5): x = 10 -> z = mul_1702(5) = 7 = m; e1 = 10 << 23,
    # e2 = ShiftExp(-7): p = -7 - 4 + 1 = -10, q = 1, r = 0, b = 10 -> 10 << 22; sigma = 128 * 2/3 = 85.3
    # -> 850; x = -10: z - m = -25: p = -36, q = 3, r = -6, b = 7 -> 7 << 20; sigma = 128 * 7/47 = 19.1 -> -190
    capped = intops.LambdaGeluParams(i0=10, cap=5, frac_bits=0)
    assert intops.lambda_shift_gelu(x, capped).tolist() == [[-190, 0, 850]]


@given(
    st.lists(st.lists(st.integers(-128, 127), min_size=8, max_size=8), min_size=1, max_size=8),
    st.integers(1, 200),
)
def test_gelu_variants_full_int8_range(rows, i0):
    x = torch.tensor(rows)
    lam = intops.LambdaGeluParams(i0=i0 * 16, cap=6 * i0 * 16, frac_bits=4)
    for out in (intops.shift_gelu(x, i0), intops.lambda_shift_gelu(x, lam)):
        assert out.dtype == torch.int64
        assert (out.abs() <= 128 * 128).all()  # INT8 * [0, 128] fits INT16
        assert ((out == 0) | (torch.sign(out) == torch.sign(x))).all()  # GELU keeps the sign


@given(st.lists(st.integers(-128, 127), min_size=4, max_size=64), st.integers(1, 200))
def test_lambda_equals_shift_gelu_below_lambda(row, i0):
    x = torch.tensor([row])
    params = intops.LambdaGeluParams(i0=i0, cap=max(int(x.max()), 0) + 1, frac_bits=0)
    assert torch.equal(intops.lambda_shift_gelu(x, params), intops.shift_gelu(x, i0))


@pytest.mark.parametrize("name,row", [
    ("constant", [5] * 3072), ("all_min", [-128] * 3072), ("all_max", [127] * 3072),
    ("zero", [0] * 3072), ("outlier", [1] * 3071 + [127]),
])
def test_gelu_adversarial_rows_stay_finite_and_bounded(name, row):
    x = torch.tensor([row])
    for scale in (0.005, 0.05, 0.5):
        i0 = intops.exp_i0(scale)
        for out in (intops.shift_gelu(x, i0), intops.lambda_shift_gelu(x, intops.lambda_shift_gelu_params(scale))):
            assert (out.abs() <= 128 * 128).all()
            err = (out * scale / 128 - real_gelu(x * scale)).abs().max()
            assert err < 0.1 + 0.01 * float(x.abs().max() * scale), (name, scale, err)


def test_lambda_shift_gelu_beats_shift_gelu_on_long_tails():
    q, scale = quantize_rows(long_tailed_rows())
    ref = real_gelu(q * scale)
    i0 = intops.exp_i0(scale)
    shift = intops.shift_gelu(q, i0) * scale / 128
    lam = intops.lambda_shift_gelu(q, intops.lambda_shift_gelu_params(scale)) * scale / 128
    rmse_shift = (shift - ref).pow(2).mean().sqrt()
    rmse_lam = (lam - ref).pow(2).mean().sqrt()
    assert rmse_shift > 0.2  # ShiftGELU collapses to x/2 on the bulk of the row
    assert rmse_lam < rmse_shift / 20
    assert (lam[:, 7] - ref[:, 7]).abs().max() < 0.2  # the outlier itself passes through (20 -> ~20)


def test_gelu_error_on_gaussian_rows():
    q, scale = quantize_rows(torch.randn(64, 768, generator=torch.Generator().manual_seed(1)))
    ref = real_gelu(q * scale)
    i0 = intops.exp_i0(scale)
    lam = intops.lambda_shift_gelu_params(scale)
    for out in (intops.shift_gelu(q, i0), intops.lambda_shift_gelu(q, lam)):
        assert (out * scale / 128 - ref).abs().max() < 0.05


def test_poly_gelu_hand_case():
    # a = -1/16, b = -2 (clip |u| at 2), S = sqrt(2)/8 -> clip = round(2 sqrt 2 / S) = 16
    # ratio = a S**4 / 4 * 2**6 = -1/16 * (1/1024) / 4 * 64 = -1/1024
    params = intops.poly_gelu_params(-1 / 16, -2.0, math.sqrt(2) / 8)
    assert params.clip == 16 and params.pre_shift == 0
    # x = 8 (u = 1): c = 8 - 16 = -8; c**4 = 4096; P = round(-4096/1024) = -4; |L| = 64 - 4 = 60
    # phi = 64 + 60 = 124 -> 8 * 124 = 992.   x = -8: phi = 64 - 60 = 4 -> -32.   x = 20: |L| = 64 -> 2560
    assert intops.poly_gelu(torch.tensor([8, -8, 20, 0]), params).tolist() == [992, -32, 2560, 0]


def test_poly_gelu_fit_and_error():
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(2)) * 1.5
    a, b = intops.fit_poly_gelu(x)
    assert a < 0 and -5.0 <= b < 0
    q, scale = quantize_rows(x)
    out = intops.poly_gelu(q, intops.poly_gelu_params(a, b, scale)) * scale / 128
    assert (out - real_gelu(q * scale)).abs().max() < 0.05
    assert (out.abs() <= 128 * 128 * scale / 128).all()


def test_poly_gelu_rejects_empty_calibration_and_bad_b():
    with pytest.raises(ValueError, match="calibration"):
        intops.fit_poly_gelu(torch.tensor([]))
    with pytest.raises(ValueError, match="b must be < 0"):
        intops.poly_gelu_params(-0.1, 1.0, 0.1)


def test_lambda_shift_gelu_params():
    assert intops.lambda_shift_gelu_params(0.05, 6.0, frac_bits=0) == (20, 120, 0)
    assert intops.lambda_shift_gelu_params(0.05, 6.0) == (320, 1920, 4)
    with pytest.raises(ValueError, match="lambda"):
        intops.lambda_shift_gelu_params(0.05, 0.0)

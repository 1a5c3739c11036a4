import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from iseg_plugin import intops
from iseg_plugin.intops import Dyadic


def test_dyadic_hand_cases():
    d = intops.dyadic_from_ratio(torch.tensor([0.5, 0.3, -0.25, 0.0, 3.0], dtype=torch.float64))
    assert d.multiplier.tolist() == [2**30, 1288490189, -(2**30), 0, 3 * 2**29]
    assert d.shift.tolist() == [31, 32, 32, 0, 29]


@given(st.floats(min_value=1e-9, max_value=2.0**30, allow_nan=False))
def test_dyadic_relative_error(r):
    d = intops.dyadic_from_ratio(r)
    assert 2**30 <= abs(int(d.multiplier)) < 2**31
    assert 0 <= int(d.shift) <= 62
    assert abs(float(d.ratio()) - r) <= r * 2.0**-31


@pytest.mark.parametrize("bad", [2.0**31, float("inf"), float("nan")])
def test_dyadic_rejects_bad_ratio(bad):
    with pytest.raises(ValueError):
        intops.dyadic_from_ratio(bad)


def test_requantize_round_half_up_and_clamp():
    half = intops.dyadic_from_ratio(0.5)
    x = torch.tensor([-7, -5, -1, 1, 3, 5, 300, -300])
    # -3.5 -> -3, -2.5 -> -2, -0.5 -> 0, 0.5 -> 1, 1.5 -> 2, 2.5 -> 3, 150 -> 127, -150 -> -128
    assert intops.requantize(x, half, 8).tolist() == [-3, -2, 0, 1, 2, 3, 127, -128]
    assert intops.requantize(x, half, None).tolist()[-2:] == [150, -150]


@given(
    st.lists(st.integers(-(2**31) + 1, 2**31 - 1), min_size=1, max_size=32),
    st.floats(min_value=1e-6, max_value=1e3),
)
def test_requantize_exact_against_python_integers(values, ratio):
    d = intops.dyadic_from_ratio(ratio)
    m, e = int(d.multiplier), int(d.shift)
    expected = [(v * m + ((1 << e) >> 1)) >> e for v in values]  # Python ints never overflow
    assert intops.requantize(torch.tensor(values), d, None).tolist() == expected


def test_requantize_is_exact_beyond_float64():
    # I-ViT's float64 fixedpoint_mul fails here: |x * m| > 2**53
    x = torch.tensor([2**31 - 1, -(2**31) + 3, 1234567891])
    d = intops.dyadic_from_ratio(0.7071067811865476)
    m, e = int(d.multiplier), int(d.shift)
    expected = [(v * m + (1 << (e - 1))) >> e for v in x.tolist()]
    assert intops.requantize(x, d, None).tolist() == expected


def test_requantize_to_asymmetric_bounds():
    d = intops.Dyadic(torch.tensor(1), torch.tensor(1))  # x / 2, half up
    x = torch.tensor([-20, -9, -1, 0, 3, 600])
    assert intops.requantize(x, d, (-4, 251)).tolist() == [-4, -4, 0, 0, 2, 251]
    assert intops.requantize(x.double(), d, (-4, 251)).tolist() == [-4, -4, 0, 0, 2, 251]  # QAT path


def test_requantize_per_channel_broadcasts_on_last_dim():
    d = intops.dyadic_from_ratio(torch.tensor([0.5, 0.25]))
    assert intops.requantize(torch.tensor([[8, 8], [-8, 3]]), d, 8).tolist() == [[4, 2], [-4, 1]]


def test_requantize_add_hand_case():
    a, b = torch.tensor([10, -10, 3]), torch.tensor([4, 4, 1])
    out = intops.requantize_add(a, intops.dyadic_from_ratio(0.5), b, intops.dyadic_from_ratio(0.25), bits=4)
    # [5 + 1, -5 + 1, round(1.5) + round(0.25)] = [6, -4, 2]; clamped to int4 [-8, 7]
    assert out.tolist() == [6, -4, 2]
    big = intops.requantize_add(torch.tensor([100]), Dyadic(torch.tensor(1), torch.tensor(0)), torch.tensor([0]),
                                Dyadic(torch.tensor(1), torch.tensor(0)), bits=4)
    assert big.tolist() == [7]


def test_requantize_error_bound_against_float():
    x = torch.randint(-(2**24), 2**24, (10_000,), generator=torch.Generator().manual_seed(0))
    r = 0.0123456789
    out = intops.requantize(x, intops.dyadic_from_ratio(r), None)
    assert (out.double() - x.double() * r).abs().max() <= 0.5 + 2**24 * r * 2.0**-31
    assert math.isfinite(float(out.abs().max()))


@given(
    st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=32),
    st.floats(min_value=0.5, max_value=2.0**29),  # shifts below 31 (int32 inputs are clamped first)
    st.sampled_from([8, 16, (-4, 251), (0, 255)]),
)
def test_requantize_of_int32_equals_python_integers(values, ratio, bits):
    d = intops.dyadic_from_ratio(ratio)
    m, e = int(d.multiplier), int(d.shift)
    lo, hi = intops.int_range(bits)
    want = [min(max((v * m + ((1 << e) >> 1)) >> e, lo), hi) for v in values]
    got = intops.requantize(torch.tensor(values, dtype=torch.int32), d, bits)
    assert got.dtype == torch.int64
    assert got.tolist() == want

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from iseg_plugin import intops


def test_isqrt_exhaustive_small_range():
    x = torch.arange(0, 1 << 17)
    expected = torch.tensor([math.isqrt(v) for v in range(1 << 17)])
    assert torch.equal(intops.isqrt(x), expected)


def test_isqrt_where_ivit_newton_fails():
    # I-ViT's 10 Newton steps from 2**16 give 64 and 108 here
    assert intops.isqrt(torch.tensor([100, 10_000])).tolist() == [10, 100]


@given(st.lists(st.integers(0, 2**62 - 1), min_size=1, max_size=64))
def test_isqrt_exact_full_range(values):
    assert intops.isqrt(torch.tensor(values)).tolist() == [math.isqrt(v) for v in values]


def test_isqrt_around_perfect_squares_and_the_top():
    roots = [1, 2, 3, 2**15, 2**20 + 7, 2**31 - 1]
    values = [r * r + d for r in roots for d in (-1, 0, 1) if 0 <= r * r + d < 2**62] + [2**62 - 1]
    assert intops.isqrt(torch.tensor(values)).tolist() == [math.isqrt(v) for v in values]


@pytest.mark.parametrize("bad", [-1, 2**62])
def test_isqrt_rejects_out_of_range(bad):
    with pytest.raises(ValueError, match="isqrt"):
        intops.isqrt(torch.tensor([bad]))


def test_i_layernorm_hand_case():
    # row [1, 3]: mean 2, y = [-1, 1], V = 2, y / sqrt(V) * 2**15 = +-23170.48 -> [-23170, 23170]
    weight, bias = torch.tensor([1, 2]), torch.tensor([0, 5])
    assert intops.i_layernorm(torch.tensor([[1, 3]]), weight, bias).tolist() == [[-23170, 2 * 23170 + 5]]
    # a constant row (zero variance) gives the bias, with no division by zero
    assert intops.i_layernorm(torch.tensor([[7, 7]]), weight, bias).tolist() == [[0, 5]]


def _ln_params(channels, seed=0):
    g = torch.Generator().manual_seed(seed)
    gamma = 1 + 0.3 * torch.randn(channels, generator=g)
    gamma[3] = 1e-9  # a dead channel: I-ViT's beta/gamma bias would blow up here
    beta = 0.5 * torch.randn(channels, generator=g)
    return gamma, beta, intops.layernorm_params(gamma, beta)


def test_i_layernorm_error_full_int16_rows():
    channels = 768
    gamma, beta, params = _ln_params(channels)
    g = torch.Generator().manual_seed(1)
    rows = [
        torch.randint(-(2**15), 2**15, (4, channels), generator=g),  # full INT16 range
        torch.randint(-3, 4, (4, channels), generator=g),  # tiny variance: I-ViT's isqrt fails
        torch.cat([torch.full((1, channels - 1), -(2**15)), torch.tensor([[2**15 - 1]])], 1),  # one outlier
    ]
    for x in rows:
        z = intops.i_layernorm(x, params.weight, params.bias)
        assert (z.abs() < 2**31).all()
        ref = torch.nn.functional.layer_norm(x.double(), (channels,), gamma.double(), beta.double(), eps=0.0)
        assert (z * params.out_scale - ref).abs().max() < 2e-3 * float(gamma.abs().max() * math.sqrt(channels)) + 1e-3


def test_i_layernorm_fused_requantize_equals_two_steps():
    _, _, params = _ln_params(64)
    x = torch.randint(-(2**15), 2**15, (8, 64), generator=torch.Generator().manual_seed(3))
    out = intops.dyadic_from_ratio(params.out_scale / 0.05)
    fused = intops.i_layernorm(x, params.weight, params.bias, out=out, out_bits=8)
    assert torch.equal(fused, intops.requantize(intops.i_layernorm(x, params.weight, params.bias), out, 8))
    assert fused.min() >= -128 and fused.max() <= 127


def test_l2_normalize_hand_case_and_zero_row():
    # [3, 4] / 5 * 2**15 = [19660.8, 26214.4] -> [19661, 26214]; a zero row stays 0
    assert intops.l2_normalize(torch.tensor([[3, 4], [0, 0]])).tolist() == [[19661, 26214], [0, 0]]


@given(st.lists(st.integers(-(2**20), 2**20), min_size=1, max_size=64))
def test_l2_normalize_within_one_lsb(values):
    x = torch.tensor([values])
    out = intops.l2_normalize(x)
    ref = torch.nn.functional.normalize(x.double(), dim=-1) * 2**15
    assert (out - ref).abs().max() <= 1.0
    assert out.abs().max() <= 2**15


def test_i_layernorm_eps_hand_case_and_small_variance_rows():
    # row [1, 3] with eps = 2 LSB**2: V = 2 + 2 * 2 = 6, y / sqrt(6) * 2**15 = +-13377.5 -> [-13377, 13377]
    ones, zeros = torch.tensor([1, 1]), torch.tensor([0, 0])
    assert intops.i_layernorm(torch.tensor([[1, 3]]), ones, zeros, eps=2).tolist() == [[-13377, 13377]]
    # near-uniform rows (e.g. class masks): with eps the integer LayerNorm follows the float one
    scale, eps = 1e-4, 1e-5
    x = torch.randint(-20, 21, (8, 7), generator=torch.Generator().manual_seed(4))
    gamma, beta = torch.ones(7), torch.zeros(7)
    p = intops.layernorm_params(gamma, beta)
    z = intops.i_layernorm(x, p.weight, p.bias, eps=intops.layernorm_eps(eps, scale)) * p.out_scale
    ref = torch.nn.functional.layer_norm(x.double() * scale, (7,), eps=eps)
    assert (z - ref).abs().max() < 2e-3
    assert (intops.i_layernorm(x, p.weight, p.bias) * p.out_scale - ref).abs().max() > 0.5  # without eps: far off

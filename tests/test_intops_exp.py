import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from iseg_plugin import intops
from iseg_plugin.intops.exp import _shift_exp_int

int8_rows = st.lists(st.integers(-128, 127), min_size=1, max_size=64)
int16_rows = st.lists(st.integers(-(2**15), 2**15 - 1), min_size=1, max_size=64)


def test_exp_i0():
    assert intops.exp_i0(0.1) == 10
    assert intops.exp_i0(3.0) == 1  # never 0: I0 is a divisor


def test_shift_exp_hand_cases():
    # x = 0: exp(0) = 1 -> i0 * 2**k exactly
    assert intops.shift_exp(torch.tensor([0]), 16, 15).item() == 16 * 2**15
    # x = -16 with i0 = 16 (exp(-1)): p = -16 - 8 + 1 = -23; q = 1, r = -7; b = (-7 >> 1) + 16 = 12
    # -> 12 << 14 = 196608, i.e. 196608 / (16 * 2**15) = 0.375 ~ exp(-1) = 0.368
    assert intops.shift_exp(torch.tensor([-16]), 16, 15).item() == 196608
    # far below the clamp: exponent -k_inter -> q = k_inter, r = 0, b = i0 -> i0 << 0
    assert intops.shift_exp(torch.tensor([-10_000]), 16, 15).item() == 16


@given(int16_rows, st.integers(1, 2000), st.integers(8, 23))
def test_shift_exp_range(values, i0, k):
    x = -torch.tensor(values).abs()
    e = _shift_exp_int(x, i0, k)
    assert (e > 0).all() and (e <= i0 * 2**k).all()


def test_shiftmax_hand_cases():
    # two equal logits: 1/2 each -> 2**14 at k_out = 16
    assert intops.shiftmax(torch.tensor([[5, 5]]), 10).tolist() == [[16384, 16384]]
    # one-element row: probability exactly 1 = 2**(k_out-1), which needs unsigned k_out bits
    assert intops.shiftmax(torch.tensor([[-7]]), 10, k_out=16).item() == 32768
    assert intops.shiftmax(torch.tensor([[-7]]), 10, k_out=8).item() == 128
    # [0, -10] with i0 = 10 (exp(-1)): -10 -> p = -10 - 5 + 1 = -14, q = 1, r = -4, b = -2 + 10 = 8
    # e = [10 << 15, 8 << 14] = [327680, 131072]; * 2**15 / 458752 = [23405.7, 9362.3]
    assert intops.shiftmax(torch.tensor([[0, -10]]), 10).tolist() == [[23406, 9362]]


@pytest.mark.parametrize("fn", ["shiftmax", "bit_exp"])
@given(rows=st.lists(int16_rows, min_size=1, max_size=4), i0=st.integers(1, 512), k_out=st.sampled_from([8, 16]))
def test_softmax_properties_full_int16_range(fn, rows, i0, k_out):
    n = max(len(r) for r in rows)
    x = torch.tensor([r + [r[0]] * (n - len(r)) for r in rows])
    out = (intops.shiftmax(x, i0, k_out=k_out) if fn == "shiftmax"
           else intops.bit_exp_softmax(x, intops.bit_exp_params(1.0 / i0), k_out=k_out))
    one = 2 ** (k_out - 1)
    assert out.dtype == torch.int64
    assert (out >= 0).all() and (out <= one).all()
    assert ((out.sum(-1) - one).abs() <= n).all()  # each entry rounded once


ADVERSARIAL_ROWS = {
    "constant": [3] * 197,
    "one_hot": [127] + [-128] * 196,
    "all_min": [-128] * 197,
    "all_max": [127] * 197,
    "outlier": [0] * 196 + [127],
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL_ROWS))
def test_softmax_adversarial_rows(name):
    x = torch.tensor([ADVERSARIAL_ROWS[name]])
    for scale in (0.01, 0.1, 1.0):
        ref = torch.softmax(x * scale, -1)
        sm = intops.shiftmax(x, intops.exp_i0(scale)) / 2**15
        be = intops.bit_exp_softmax(x, intops.bit_exp_params(scale)) / 2**15
        assert torch.isfinite(sm).all() and torch.isfinite(be).all()
        assert (sm - ref).abs().max() < 0.06  # ShiftExp: linear 2**f and 1.4375 for log2 e
        assert (be - ref).abs().max() < 0.01
    if name in ("constant", "all_min", "all_max"):
        assert intops.shiftmax(x, 10).unique().numel() == 1  # equal logits, equal probabilities


def test_softmax_error_against_float_on_attention_like_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 197, 197, generator=g) * 2.5
    scale = float(logits.abs().max()) / 127
    x = torch.round(logits / scale).clamp(-128, 127).long()
    ref = torch.softmax(x * scale, -1)
    sm = intops.shiftmax(x, intops.exp_i0(scale)) / 2**15
    be = intops.bit_exp_softmax(x, intops.bit_exp_params(scale)) / 2**15
    assert (sm - ref).abs().max() < 0.03
    assert (be - ref).abs().max() < 0.003
    assert (be - ref).pow(2).mean() < (sm - ref).pow(2).mean() / 10


@given(int16_rows, st.integers(1, 12000), st.integers(8, 23))  # tables and, past TABLE_MAX, direct
def test_shift_exp_lookup_equals_direct(values, i0, k):
    from iseg_plugin.intops.exp import _shift_exp_int, shift_exp_lookup

    x = -torch.tensor(values).abs()
    assert torch.equal(shift_exp_lookup(x, i0, k), _shift_exp_int(x, i0, k))  # table or direct: same integers


@given(int16_rows, st.floats(1e-4, 0.5))
def test_softmaxes_of_int16_read_from_a_table_equal_the_direct_integers(values, scale):
    from iseg_plugin.intops import exp
    from iseg_plugin.intops._bridge import divide

    def normalized(e):
        return divide(e, e.sum(-1, keepdim=True), 15)

    x = torch.tensor([values], dtype=torch.int16)
    d = x.long() - x.long().amax(-1, keepdim=True)  # down to -65535: the int16 table's whole range
    i0, params = intops.exp_i0(scale), intops.bit_exp_params(scale)
    assert exp._shift_exp_table(i0, 15, 65535).values is not None  # the table path is the one tested
    assert exp._bit_exp_table(int(params.multiplier), int(params.shift), 15, 65535).values is not None
    assert torch.equal(intops.shiftmax(x, i0), normalized(_shift_exp_int(d, i0, 15)))
    assert torch.equal(intops.bit_exp_softmax(x, params), normalized(exp._bit_exp_int(d, *params, 15)))

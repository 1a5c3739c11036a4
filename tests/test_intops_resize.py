import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from iseg_plugin import intops


def test_nearest_hand_case():
    x = torch.tensor([[[[1, 2], [3, 4]]]])
    assert intops.upsample_nearest(x, (4, 4)).tolist() == [[[[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]]]


@pytest.mark.parametrize("size", [(32, 48), (7, 5), (20, 9)])
def test_nearest_matches_torch(size):
    x = torch.randint(-(2**31), 2**31 - 1, (2, 3, 4, 6))
    assert torch.equal(intops.upsample_nearest(x, size), F.interpolate(x.double(), size, mode="nearest").long())


def test_bilinear_hand_case():
    # src = (dst + 0.5) / 2 - 0.5 = [0 (clamped), 0.25, 0.75, 1.25 -> last]: [0, 2.5, 7.5, 10] -> [0, 3, 8, 10]
    x = torch.tensor([[[[0, 10]]]])
    assert intops.upsample_bilinear(x, (1, 4)).tolist() == [[[[0, 3, 8, 10]]]]
    table = intops.bilinear_table(2, 4)
    assert table.denominator == 4 and table.w_hi.tolist() == [0, 1, 3, 1]


@given(
    st.integers(1, 12), st.integers(1, 12), st.integers(1, 40), st.integers(1, 40),
    st.sampled_from([2**7, 2**15, 2**31 - 1]),
)
def test_bilinear_within_one_lsb_of_torch(h, w, out_h, out_w, high):
    x = torch.randint(-high, high, (1, 2, h, w), generator=torch.Generator().manual_seed(h * 100 + w))
    ours = intops.upsample_bilinear(x, (out_h, out_w))
    ref = F.interpolate(x.double(), (out_h, out_w), mode="bilinear", align_corners=False)
    assert (ours - ref).abs().max() <= 1.0


def test_bilinear_x16_is_exact_rounding():
    x = torch.randint(-(2**15), 2**15, (1, 11, 8, 8))
    ours = intops.upsample_bilinear(x, (128, 128))
    ref = F.interpolate(x.double(), (128, 128), mode="bilinear", align_corners=False)
    assert (ours - ref).abs().max() <= 0.5
    assert intops.bilinear_table(8, 128).denominator == 32


def test_bilinear_align_corners_hand_case():
    # align_corners=True, 2 -> 4: src = dst * 1 / 3 = [0, 1/3, 2/3, 1]: [0, 3.33, 6.67, 10] -> [0, 3, 7, 10]
    x = torch.tensor([[[[0, 10]]]])
    assert intops.upsample_bilinear(x, (1, 4), align_corners=True).tolist() == [[[[0, 3, 7, 10]]]]
    table = intops.bilinear_table(2, 4, align_corners=True)
    assert table.denominator == 3 and table.w_hi.tolist() == [0, 1, 2, 0] and table.lo.tolist() == [0, 0, 0, 1]


@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 40), st.integers(1, 40), st.sampled_from([2**7, 2**15]))
def test_bilinear_align_corners_within_half_an_lsb_of_the_exact_value(h, w, out_h, out_w, high):
    """DPT's fusion blocks and head upsample with align_corners=True."""
    x = torch.randint(-high, high, (1, 2, h, w), generator=torch.Generator().manual_seed(h * 100 + w))
    ours = intops.upsample_bilinear(x, (out_h, out_w), align_corners=True)
    ref = F.interpolate(x.double(), (out_h, out_w), mode="bilinear", align_corners=True)
    assert ours.shape == ref.shape and (ours - ref).abs().max() <= 0.5 + 1e-6
    xf = x.double().requires_grad_()
    out = intops.upsample_bilinear(xf, (out_h, out_w), align_corners=True)
    assert torch.equal(out.detach().long(), ours)
    out.sum().backward()
    assert torch.isfinite(xf.grad).all()

"""Integer convolutions of any geometry (iseg_plugin.intops.conv): exact against the float convolution of the same
integers."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from iseg_plugin import intops
from iseg_plugin.intops import conv as C


def ints(shape, lo=-128, hi=128, seed=0):
    return torch.randint(lo, hi, shape, generator=torch.Generator().manual_seed(seed))


def test_hand_case():
    # 1 x 1 x 3 x 3 input 1..9, 2 x 2 kernel of ones, stride 1, padding 0: window sums 12 16 24 28, + bias 1
    x = torch.arange(1, 10).view(1, 1, 3, 3)
    w = torch.ones(1, 1, 2, 2, dtype=torch.int64)
    assert C.conv2d_acc(x, w, torch.tensor([1])).tolist() == [[[[13, 17], [25, 29]]]]
    # padding 1 with the zero point 5 as pad value: the corner window is 5 + 5 + 5 + 1 = 16
    assert int(C.conv2d_acc(x, w, None, padding=1, pad_value=5)[0, 0, 0, 0]) == 16
    # transposed, stride 2, 1 x 1 input 3 and a 2 x 2 kernel 1 2 3 4: the kernel times 3
    assert C.conv_transpose2d_acc(torch.tensor([[[[3]]]]), torch.tensor([[[[1, 2], [3, 4]]]]), stride=2).tolist() == \
        [[[[3, 6], [9, 12]]]]


GEOMETRIES = [
    dict(stride=1, padding=1), dict(stride=4, padding=3), dict(stride=2, padding=1), dict(stride=1, padding="same"),
    dict(stride=1, padding="valid"), dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2)), dict(stride=1, padding=2, dilation=2),
    dict(stride=1, padding=1, groups=8), dict(stride=2, padding=1, groups=2), dict(stride=1, padding="same", dilation=3, groups=8)]


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("kernel", [(3, 3), (7, 7), (1, 1), (2, 3)])
def test_conv2d_equals_the_float_convolution_of_the_integers(geometry, kernel):
    groups = geometry.get("groups", 1)
    x = ints((2, 8, 13, 11))
    w = ints((16, 8 // groups, *kernel), seed=1)
    b = ints((16,), -(2**20), 2**20, seed=2)
    try:
        ref = F.conv2d(x.double(), w.double(), b.double(), **geometry)
    except RuntimeError:  # (a kernel larger than the padded input: refused by both)
        with pytest.raises(ValueError, match="larger than the padded input"):
            C.conv2d_acc(x, w, b, **geometry)
        return
    acc = C.conv2d_acc(x, w, b, **geometry)
    assert acc.dtype == torch.int64 and acc.shape == ref.shape and torch.equal(acc.double(), ref)
    assert acc.abs().max() < 2**31  # INT8 x INT8, K <= 8 * 49, 21-bit bias: an INT32 accumulator


def test_padding_with_the_zero_point_is_the_float_convolution_of_real_zeros():
    zp = -7  # an asymmetric INT8 grid: real 0 is the integer -7
    x = ints((1, 4, 9, 9), seed=3)
    w = ints((6, 4, 3, 3), seed=4)
    acc = C.conv2d_acc(x, w, None, 2, 1, pad_value=zp)
    # (x - zp) is the real value over the scale: convolve it with zero padding, then add back zp * sum(w)
    ref = F.conv2d((x - zp).double(), w.double(), None, 2, 1) + zp * w.double().sum((1, 2, 3)).view(1, -1, 1, 1)
    assert torch.equal(acc.double(), ref)


@given(st.integers(1, 3), st.integers(1, 4), st.integers(0, 2), st.integers(0, 1), st.integers(1, 2), st.sampled_from([1, 2, 4]),
       st.integers(2, 6))
def test_conv_transpose2d_any_geometry(stride, kernel, padding, output_padding, dilation, groups, size):
    if output_padding >= max(stride, dilation):
        output_padding = 0
    x = ints((1, 4, size, size + 1), seed=size)
    w = ints((4, 8 // groups, kernel, kernel), seed=kernel)
    b = ints((8,), seed=7)
    args = (stride, padding, output_padding, groups, dilation)
    try:
        ref = F.conv_transpose2d(x.double(), w.double(), b.double(), *args)
    except RuntimeError:
        with pytest.raises((ValueError, RuntimeError)):
            C.conv_transpose2d_acc(x, w, b, *args)
        return
    acc = C.conv_transpose2d_acc(x, w, b, *args)
    assert acc.shape == ref.shape and torch.equal(acc.double(), ref)


@pytest.mark.parametrize("args", [(2, 0, 0, 1, 1), (4, 0, 0, 1, 1), (2, 1, 1, 1, 1), (2, 1, 0, 2, 2), (3, 2, 1, 4, 1)])
def test_fpn_upsamplers(args):
    """BEiT's / DPT's FPN: ConvTranspose2d(k=s, s) on token maps; and other geometries."""
    stride = args[0]
    x = ints((2, 8, 4, 4), seed=8)
    w = ints((8, 8 // args[3], max(stride, 2), max(stride, 2)), seed=9)
    acc = C.conv_transpose2d_acc(x, w, None, *args)
    assert torch.equal(acc.double(), F.conv_transpose2d(x.double(), w.double(), None, *args))


def test_requantized_conv_is_the_rounded_real_convolution():
    x = ints((2, 8, 9, 9), seed=10)
    w = ints((16, 1, 3, 3), seed=11)  # depthwise x 2
    sx, sw, s_out = 0.05, torch.rand(16, generator=torch.Generator().manual_seed(0)) * 0.01 + 0.001, 0.02
    out = C.conv2d(x, w, None, intops.dyadic_from_ratio(sx * sw.double() / s_out), 8, 1, 1, groups=8)
    real = F.conv2d(x.double() * sx, w.double() * sw.double().view(-1, 1, 1, 1), None, 1, 1, groups=8) / s_out
    assert out.min() >= -128 and out.max() <= 127
    inside = real.abs() < 127
    assert float((out.double() - real)[inside].abs().max()) <= 0.5 + 1e-6


def test_qat_path_gives_the_integers_and_the_float_gradients():
    x, w, b = ints((2, 4, 8, 8)), ints((6, 2, 3, 3), seed=1), ints((6,), seed=2)
    xf, wf, bf = (t.double().requires_grad_() for t in (x, w, b))
    out = C.conv2d_acc(xf, wf, bf, 2, 1, groups=2)
    assert out.dtype == torch.float64 and torch.equal(out.detach().long(), C.conv2d_acc(x, w, b, 2, 1, groups=2))
    out.square().sum().backward()
    xr, wr, br = (t.double().requires_grad_() for t in (x, w, b))
    F.conv2d(xr, wr, br, 2, 1, groups=2).square().sum().backward()
    for a, r in ((xf, xr), (wf, wr), (bf, br)):
        torch.testing.assert_close(a.grad, r.grad)
    yt = x.double().requires_grad_()
    wt = ints((4, 3, 2, 2), seed=5)
    out = C.conv_transpose2d_acc(yt, wt, None, 2)
    assert torch.equal(out.detach().long(), C.conv_transpose2d_acc(x, wt, None, 2))
    out.sum().backward()
    assert yt.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32])
def test_narrow_integer_inputs_widen_to_int64(dtype):
    x, w = ints((1, 3, 6, 6)).to(dtype), ints((4, 3, 3, 3), seed=1).to(torch.int8)
    assert torch.equal(C.conv2d_acc(x, w, None, 1, 1), C.conv2d_acc(x.long(), w.long(), None, 1, 1))


def test_refusals():
    with pytest.raises(ValueError, match="stride 1"):
        C.conv2d_acc(ints((1, 3, 6, 6)), ints((4, 3, 3, 3)), None, 2, "same")
    with pytest.raises(ValueError, match="do not match"):
        C.conv2d_acc(ints((1, 3, 6, 6)), ints((4, 2, 3, 3)), None, groups=2)
    with pytest.raises(ValueError, match="larger than the padded input"):
        C.conv2d_acc(ints((1, 3, 2, 2)), ints((4, 3, 3, 3)))

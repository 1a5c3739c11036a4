"""Integer average / adaptive average pooling (window sums + one dyadic requantization) and max pooling (exact)."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from iseg_plugin import intops


def int16(shape, seed=0):
    return torch.randint(-32768, 32768, shape, generator=torch.Generator().manual_seed(seed))


def test_avg_pool_hand_case():
    # 1 x 1 x 2 x 4, kernel 2: window sums [1+2+5+6, 3+4+7+8] = [14, 22], mean 3.5 and 5.5 -> round half up 4, 6
    x = torch.tensor([[[[1, 2, 3, 4], [5, 6, 7, 8]]]])
    assert intops.avg_pool(x, intops.avg_pool_params((2, 4), 2)).tolist() == [[[[4, 6]]]]
    # to an output scale twice the input's: 14 / 8 = 1.75 -> 2, 22 / 8 = 2.75 -> 3
    assert intops.avg_pool(x, intops.avg_pool_params((2, 4), 2, in_scale=1.0, out_scale=2.0)).tolist() == [[[[2, 3]]]]
    # padding 1, stride 2, count_include_pad=False: the corner window holds only x[0, 0] = 1 (divisor 1)
    out = intops.avg_pool(x, intops.avg_pool_params((2, 4), 2, 2, 1, count_include_pad=False))
    assert out[0, 0, 0].tolist() == [1, 3, 4] and out[0, 0, 1].tolist() == [5, 7, 8]
    # negative values round half up too: (-1 - 2) / 2 = -1.5 -> -1
    assert intops.avg_pool(torch.tensor([[-1, -2]]), intops.avg_pool_params((2,), 2)).tolist() == [[-1]]


@pytest.mark.parametrize("args", [
    dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=2), dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0)),
    dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
    dict(kernel_size=3, stride=2, padding=1, ceil_mode=True), dict(kernel_size=3, stride=1, padding=1, divisor_override=5),
    dict(kernel_size=5, stride=3, ceil_mode=True)])
def test_avg_pool_is_the_rounded_float_pool(args):
    x = int16((2, 3, 13, 11))
    kernel, stride = args["kernel_size"], args.get("stride")
    params = intops.avg_pool_params((13, 11), kernel, stride, args.get("padding", 0), args.get("ceil_mode", False),
                                    args.get("count_include_pad", True), args.get("divisor_override"))
    out = intops.avg_pool(x, params, bits=None)
    ref = F.avg_pool2d(x.double(), **args)
    assert out.shape == ref.shape and out.dtype == torch.int64
    assert float((out - ref).abs().max()) <= 0.5 + 1e-6  # the rounding of the exact mean, nothing else
    away = (ref - ref.floor() - 0.5).abs() > 1e-6  # off ties: round half up exactly
    assert torch.equal(out[away], torch.floor(ref[away] + 0.5).long())


@pytest.mark.parametrize("out_size", [1, (1, 1), (3, 4), (5, 7), (13, 11), (20, 3), (6, 6)])
def test_adaptive_avg_pool_2d(out_size):
    x = int16((2, 3, 13, 11), seed=1)
    out = intops.avg_pool(x, intops.adaptive_avg_pool_params((13, 11), out_size))
    ref = F.adaptive_avg_pool2d(x.double(), out_size)
    assert out.shape == ref.shape and float((out - ref).abs().max()) <= 0.5 + 1e-6


def test_adaptive_avg_pool_1d_over_tokens_to_another_scale():
    """Swin's pooler: AdaptiveAvgPool1d(1) over 49 tokens of the INT16 residual stream, to an output scale."""
    x = int16((2, 16, 49), seed=2)
    s_in, s_out = 0.01, 0.004
    out = intops.avg_pool(x, intops.adaptive_avg_pool_params((49,), 1, s_in, s_out), bits=16)
    ref = F.adaptive_avg_pool1d(x.double() * s_in, 1) / s_out
    assert out.shape == (2, 16, 1) and float((out - ref.clamp(-32768, 32767)).abs().max()) <= 0.5 + 1e-6
    # clamped to the declared width
    wide = intops.avg_pool(x, intops.adaptive_avg_pool_params((49,), 1, 1.0, 1e-3), bits=16)
    assert wide.min() >= -32768 and wide.max() <= 32767


@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 4), st.integers(1, 3), st.integers(0, 2), st.booleans(),
       st.booleans())
def test_avg_and_max_pool_any_geometry(h, w, k, s, p, ceil, include_pad):
    if p > k // 2 or k > h + 2 * p or k > w + 2 * p:
        return
    x = torch.randint(-128, 128, (1, 2, h, w), generator=torch.Generator().manual_seed(h * 100 + w))
    params = intops.avg_pool_params((h, w), k, s, p, ceil, include_pad)
    ref = F.avg_pool2d(x.double(), k, s, p, ceil, include_pad)
    out = intops.avg_pool(x, params)
    assert out.shape == ref.shape and float((out - ref).abs().max()) <= 0.5 + 1e-6
    assert torch.equal(intops.max_pool(x, intops.max_pool_params((h, w), k, s, p, 1, ceil)).double(),
                       F.max_pool2d(x.double(), k, s, p, 1, ceil))


@pytest.mark.parametrize("args", [(3, 2, 1, 1, False), (2, 2, 0, 1, False), (3, 2, 1, 2, True), ((3, 1), (2, 1), (1, 0), 1, True),
                                  (3, 1, 1, 1, False)])
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int64])
def test_max_pool_is_exact(args, dtype):
    info = torch.iinfo(dtype)
    x = torch.randint(max(info.min, -32768), min(info.max, 32767) + 1, (2, 3, 13, 11)).to(dtype)
    out = intops.max_pool(x, intops.max_pool_params((13, 11), *args))
    assert out.dtype == torch.int64 and torch.equal(out.double(), F.max_pool2d(x.double(), *args))
    assert out.min() >= info.min and out.max() <= info.max  # padding never wins


@pytest.mark.parametrize("out_size", [1, (3, 4), (5, 7), (20, 3)])
def test_adaptive_max_pool_is_exact(out_size):
    x = int16((2, 3, 13, 11), seed=3)
    out = intops.max_pool(x, intops.adaptive_max_pool_params((13, 11), out_size))
    assert torch.equal(out.double(), F.adaptive_max_pool2d(x.double(), out_size))


def test_qat_path_gives_the_integers_and_a_gradient():
    x = int16((2, 3, 13, 11), seed=4)
    avg = intops.avg_pool_params((13, 11), 3, 2, 1, in_scale=0.1, out_scale=0.05)
    mx = intops.max_pool_params((13, 11), 3, 2, 1)
    for fn in (lambda t: intops.avg_pool(t, avg), lambda t: intops.max_pool(t, mx),
               lambda t: intops.avg_pool(t, intops.adaptive_avg_pool_params((13, 11), (2, 3)))):
        xf = x.double().requires_grad_()
        out = fn(xf)
        assert out.dtype == torch.float64 and torch.equal(out.detach().long(), fn(x))
        out.sum().backward()
        assert torch.isfinite(xf.grad).all() and xf.grad.abs().sum() > 0
    xf = x.double().requires_grad_()
    intops.avg_pool(xf, avg).sum().backward()
    ref = x.double().requires_grad_()
    (F.avg_pool2d(ref, 3, 2, 1) * 2).sum().backward()  # S_in / S_out = 2
    assert torch.allclose(xf.grad, ref.grad)


def test_wrong_sizes_and_geometry_are_refused():
    params = intops.avg_pool_params((8, 8), 2)
    with pytest.raises(ValueError, match="built for size 8"):
        intops.avg_pool(torch.zeros(1, 1, 8, 6, dtype=torch.int64), params)
    with pytest.raises(ValueError, match="half the kernel"):
        intops.max_pool_params((8, 8), 3, 1, 2)
    with pytest.raises(ValueError, match="no output"):
        intops.avg_pool_params((2, 2), 5)

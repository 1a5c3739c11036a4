"""One arithmetic: the QAT path (float tensors holding integers) gives the deployed integers."""
import pytest
import torch

from iseg_plugin import intops

G = torch.Generator().manual_seed(0)
X8 = torch.randint(-128, 128, (4, 3, 40), generator=G)
X16 = torch.randint(-(2**15), 2**15, (4, 3, 40), generator=G)
LN = intops.layernorm_params(1 + 0.2 * torch.randn(40, generator=G), torch.randn(40, generator=G))
POLY = intops.poly_gelu_params(*intops.fit_poly_gelu(torch.randn(1000, generator=G)), 0.03)

OPS = {
    "requantize": (lambda x: intops.requantize(x, intops.dyadic_from_ratio(0.013), 8), X16),
    "requantize_add": (lambda x: intops.requantize_add(x, intops.dyadic_from_ratio(0.3), x.flip(-1),
                                                       intops.dyadic_from_ratio(0.7), 16), X16),
    "shift_exp": (lambda x: intops.shift_exp(-x.abs(), 20, 15), X8),
    "shiftmax": (lambda x: intops.shiftmax(x, 12), X8),
    "bit_exp_softmax": (lambda x: intops.bit_exp_softmax(x, intops.bit_exp_params(0.08)), X8),
    "shift_gelu": (lambda x: intops.shift_gelu(x, 30), X8),
    "lambda_shift_gelu": (lambda x: intops.lambda_shift_gelu(x, intops.lambda_shift_gelu_params(1 / 30)), X8),
    "poly_gelu": (lambda x: intops.poly_gelu(x, POLY), X8),
    "i_layernorm": (lambda x: intops.i_layernorm(x, LN.weight, LN.bias, out=intops.dyadic_from_ratio(LN.out_scale / 0.04)), X16),
    "l2_normalize": (lambda x: intops.l2_normalize(x), X16),
    "upsample_nearest": (lambda x: intops.upsample_nearest(x.unsqueeze(0), (7, 80)), X16),
    "upsample_bilinear": (lambda x: intops.upsample_bilinear(x.unsqueeze(0), (7, 80)), X16),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_float_path_gives_the_same_integers(name):
    fn, x = OPS[name]
    deployed = fn(x)
    qat = fn(x.float())
    assert deployed.dtype == torch.int64 and qat.dtype == torch.float32
    assert torch.equal(qat.long(), deployed)


@pytest.mark.parametrize("name", sorted(OPS))
def test_gradients_flow_through_the_float_path(name):
    fn, x = OPS[name]
    xf = x.float().requires_grad_(True)
    out = fn(xf)
    weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape)  # a loss that is not shift-invariant
    (out * weights).sum().backward()
    assert xf.grad is not None and torch.isfinite(xf.grad).all()
    assert xf.grad.abs().sum() > 0


def test_integer_inputs_of_any_width_give_the_same_result():
    for dtype in (torch.int8, torch.int16, torch.int32):
        assert torch.equal(intops.shiftmax(X8.to(dtype), 12), intops.shiftmax(X8, 12))


def test_float_input_to_integer_primitive_is_refused():
    with pytest.raises(TypeError, match="integer tensor"):
        intops.isqrt(torch.tensor([4.0]))

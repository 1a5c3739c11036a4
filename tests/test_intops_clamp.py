"""Integer clamp / ReLU / ReLU6: exact on the quantization grid."""
import pytest
import torch
import torch.nn.functional as F

from iseg_plugin import intops


def test_hand_cases():
    x = torch.tensor([-200, -1, 0, 1, 59, 60, 61, 200])
    assert intops.relu(x).tolist() == [0, 0, 0, 1, 59, 60, 61, 200]
    assert intops.relu6(x, 0.1).tolist() == [0, 0, 0, 1, 59, 60, 60, 60]  # 6 / 0.1 = 60
    assert intops.relu(x, zero_point=-5).tolist() == [-5, -1, 0, 1, 59, 60, 61, 200]  # real 0 is the integer -5
    assert intops.clamp_bounds(0.1, -1.0, 2.5) == (-10, 25)
    assert intops.clamp_bounds(0.4, None, 1.0) == (None, 2)  # 2.5 rounds to even, as torch.round quantizes


@pytest.mark.parametrize("scale", [0.003, 0.02, 0.0471, 0.3])
@pytest.mark.parametrize("zero_point", [0, -7, 12])
def test_clamps_equal_the_float_op_requantized(scale, zero_point):
    x = torch.arange(-32768, 32768)
    real = (x - zero_point).double() * scale

    def quantize(v):
        return torch.round(v / scale).long() + zero_point

    assert torch.equal(intops.relu(x, zero_point), quantize(F.relu(real)))
    assert torch.equal(intops.relu6(x, scale, zero_point), quantize(F.relu6(real)))
    low, high = intops.clamp_bounds(scale, -1.5, 2.0, zero_point)
    assert torch.equal(intops.int_clamp(x, low, high), quantize(real.clamp(-1.5, 2.0)))


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.float32, torch.float64])
def test_same_integers_for_every_input_type_and_the_float_gradient(dtype):
    x = torch.arange(-128, 128).to(dtype)
    assert torch.equal(intops.relu6(x, 0.05).long(), intops.relu6(x.long(), 0.05))
    if dtype.is_floating_point:
        xf = x.clone().requires_grad_()
        intops.relu6(xf, 0.05).sum().backward()
        assert torch.equal(xf.grad, ((x >= 0) & (x <= 120)).to(dtype))  # 6 / 0.05 = 120


def test_refusals():
    with pytest.raises(ValueError, match="at least one bound"):
        intops.int_clamp(torch.tensor([1]), None, None)
    with pytest.raises(ValueError, match="<= high"):
        intops.clamp_bounds(0.1, 2.0, 1.0)
    with pytest.raises(ValueError, match="finite"):
        intops.clamp_bounds(0.1, float("-inf"), 1.0)

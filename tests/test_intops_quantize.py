import pytest
import torch

from iseg_plugin import intops


def test_int_range():
    assert intops.int_range(8) == (-128, 127)
    assert intops.int_range(8, narrow=True) == (-127, 127)
    assert intops.int_range(16) == (-32768, 32767)
    assert intops.int_range(8, signed=False) == (0, 255)


def test_symmetric_scale_per_tensor_and_per_channel():
    s = intops.symmetric_scale(torch.tensor(-2.54), torch.tensor(1.0), 8)
    assert s.item() == pytest.approx(2.54 / 127)
    s = intops.symmetric_scale(torch.tensor([-1.0, -0.5]), torch.tensor([0.5, 2.0]), 8)
    assert torch.allclose(s, torch.tensor([1.0, 2.0]) / 127)
    # an all-zero tensor gets a positive scale, never 0 (no division by zero downstream)
    assert intops.symmetric_scale(torch.tensor(0.0), torch.tensor(0.0), 8).item() > 0


def test_quantize_hand_case_and_clamp():
    x = torch.tensor([0.5, -1.0, 1.27, 2.0, -3.0, 0.005, 0.015])
    q = intops.quantize(x, torch.tensor(0.01), 8)
    # 0.005/0.01 = 0.5 -> 0 and 1.5 -> 2: round half to even (torch.round, as Brevitas / torch.ao)
    assert q.tolist() == [50.0, -100.0, 127.0, 127.0, -128.0, 0.0, 2.0]
    assert intops.quantize(torch.tensor([-3.0]), torch.tensor(0.01), 8, narrow=True).item() == -127


def test_asymmetric_grid_hand_case():
    # GELU-like range [-0.17, 10.03]: 255 steps of 0.04, lo = round(-0.17 / 0.04) = round(-4.25) = -4
    s = intops.asymmetric_scale(torch.tensor(-0.17), torch.tensor(10.03), 8)
    assert s.item() == pytest.approx(0.04)
    assert intops.asymmetric_bounds(torch.tensor(-0.17), s, 8) == (-4, 251)
    q = intops.quantize(torch.tensor([-0.5, -0.17, 0.0, 0.06, 10.03, 11.0]), s, (-4, 251))
    assert q.tolist() == [-4.0, -4.0, 0.0, 2.0, 251.0, 251.0]  # 0.06 / 0.04 = 1.5 -> 2 (half to even)
    # a range that does not hold 0 is widened to hold it
    s = intops.asymmetric_scale(torch.tensor(0.5), torch.tensor(2.55), 8)
    assert s.item() == pytest.approx(0.01)
    assert intops.asymmetric_bounds(torch.tensor(0.5), s, 8) == (0, 255)
    assert intops.int_range((-4, 251)) == (-4, 251)


def test_quantize_per_channel():
    w = torch.tensor([[1.0, -2.0], [0.1, 0.2]])
    scale = torch.tensor([2.0, 0.2]) / 127
    q = intops.quantize(w, scale, 8, channel_dim=0)
    assert q.tolist() == [[64.0, -127.0], [64.0, 127.0]]


def test_quantize_straight_through_gradient():
    x = torch.tensor([0.3, 5.0, -5.0], requires_grad=True)
    intops.quantize(x, torch.tensor(0.01), 8).sum().backward()
    assert x.grad.tolist() == pytest.approx([100.0, 0.0, 0.0])  # 1/S inside, 0 where clamped


def test_ema_minmax_first_batch_then_momentum():
    first = intops.ema_minmax(None, torch.tensor([-1.0, 3.0]), momentum=0.05)
    assert [v.item() for v in first] == [-1.0, 3.0]
    second = intops.ema_minmax(first, torch.tensor([-3.0, 1.0]), momentum=0.05)
    # m = 0.95 * m + 0.05 * current
    assert second[0].item() == pytest.approx(-1.1)
    assert second[1].item() == pytest.approx(2.9)


def test_ema_minmax_per_channel():
    x = torch.tensor([[1.0, -4.0], [2.0, 8.0]])
    mn, mx = intops.ema_minmax(None, x, 0.01, channel_dim=1)
    assert mn.tolist() == [1.0, -4.0] and mx.tolist() == [2.0, 8.0]


def test_running_minmax_keeps_the_extremes_of_every_batch_in_any_order():
    batches = [torch.tensor([-1.0, 3.0]), torch.tensor([-0.5, 7.0]), torch.tensor([-4.0, 0.0])]
    for order in (batches, batches[::-1]):
        running = None
        for x in order:
            running = intops.running_minmax(running, x, None)
        assert [v.item() for v in running] == [-4.0, 7.0]
    per_channel = intops.running_minmax((torch.tensor([0.0, -1.0]), torch.tensor([1.0, 1.0])),
                                        torch.tensor([[2.0, -4.0], [-3.0, 0.5]]), None, channel_dim=1)
    assert [v.tolist() for v in per_channel] == [[-3.0, -4.0], [2.0, 1.0]]
    # with a momentum: the EMA (QAT's warm-up)
    first = intops.running_minmax(None, batches[0], 0.05)
    assert [v.item() for v in intops.running_minmax(first, batches[1], 0.05)] == pytest.approx([-0.975, 3.2])


@pytest.mark.parametrize("momentum", [0.0, -0.1, 1.5])
def test_ema_minmax_rejects_bad_momentum(momentum):
    with pytest.raises(ValueError, match="momentum"):
        intops.ema_minmax(None, torch.zeros(3), momentum)

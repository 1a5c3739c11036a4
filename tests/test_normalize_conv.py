"""Eval-mode BatchNorm folded into the convolution / Linear before it (iseg_plugin.lowering.normalize_conv)."""
import pytest
import torch
from torch import fx, nn

import fx_patterns as fxp
from iseg_plugin.deploy import OpAudit
from iseg_plugin.lowering.normalize_conv import fold_batch_norm, remaining_batch_norms


def _randomise_statistics(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model


class Neck(nn.Module):
    """conv -> BN -> ReLU, a transposed conv -> BN (an FPN upsampler), a BN on a conv output that is read twice
    (not foldable), and Linear -> BatchNorm1d."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 8, 2, 2)
        self.up_bn = nn.BatchNorm2d(8)
        self.shared = nn.Conv2d(8, 8, 1)
        self.shared_bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)
        self.fc_bn = nn.BatchNorm1d(4)

    def forward(self, x):
        y = self.up_bn(self.up(torch.relu(self.bn(self.conv(x)))))
        s = self.shared(y)
        y = self.shared_bn(s) + s
        return y, self.fc_bn(self.fc(y.mean((2, 3))))


def test_batch_norms_fold_and_the_function_stays():
    torch.manual_seed(0)
    model = _randomise_statistics(Neck()).eval()
    gm = fx.symbolic_trace(model)
    folded = fold_batch_norm(gm)
    assert remaining_batch_norms(folded) == ["shared_bn"]  # its conv output is read twice
    assert remaining_batch_norms(gm) == ["bn", "up_bn", "shared_bn", "fc_bn"]  # the input graph is untouched
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        for a, b in zip(folded(x), model(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert isinstance(folded.get_submodule("up"), nn.ConvTranspose2d)
    assert not hasattr(folded, "bn") and not hasattr(folded, "up_bn")


def test_training_mode_and_non_graph_modules_are_refused():
    with pytest.raises(ValueError, match=r"BatchNorm 'bn' is in training mode.*eval\(\)"):
        fold_batch_norm(fx.symbolic_trace(Neck().train()))
    with pytest.raises(TypeError, match="symbolic_trace"):
        fold_batch_norm(Neck().eval())


class PatchesWithBatchNorm(nn.Module):
    """A patch embedding followed by BatchNorm (conv stems of hybrid ViTs), then a Linear head."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, 4)
        self.bn = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.bn(self.patch(x)).flatten(2).transpose(1, 2))


def test_folding_lets_the_fx_front_end_lower_a_conv_batch_norm_model():
    torch.manual_seed(0)
    model = _randomise_statistics(PatchesWithBatchNorm()).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 16, generator=g)
    batches = [torch.randn(2, 3, 16, 16, generator=g) for _ in range(3)]

    def calibrated(m):
        prepared = fxp.prepare(m, (x,))
        with torch.no_grad():
            for b in batches:
                prepared(b)
        return prepared

    with pytest.raises(fxp.LoweringError, match=r"node 'bn' \(call_module bn\).*no integer lowering"):
        fxp.convert(calibrated(model), (x,))
    int_model = fxp.convert(calibrated(fold_batch_norm(fx.symbolic_trace(model))), (x,))
    inputs = fxp.quantize_inputs(int_model, x)
    with torch.no_grad(), OpAudit() as audit:
        out = int_model(*inputs)
    assert audit.float_ops() == []
    with torch.no_grad():
        ref = model(x)
    cos = torch.nn.functional.cosine_similarity(out.double().flatten() * int_model.output_scales[0], ref.double().flatten(), 0)
    assert cos > 0.99

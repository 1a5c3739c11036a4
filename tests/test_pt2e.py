"""torchao PT2E (torch.export) through the same lowering: same integers as the FX flow, and real clients
the plugin did not write (Hugging Face ViT / DINOv2, mmseg's stock ViT + Segmenter head)."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fx_patterns as fxp
from iseg_plugin.fx.pt2e import decompose_attention, fuse_l2_normalize
from iseg_plugin.deploy import OpAudit

from helpers import families_harness
from test_fx_per_op import FunctionalViT, HandViT, calibrated, check_integer_model, cosine, dequantized

needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers is not installed: `make test` installs it")


@pytest.mark.parametrize("model_class,shape", [(HandViT, (2, 3, 32, 32)), (FunctionalViT, (2, 3, 16, 16))])
def test_pt2e_gives_the_integers_of_the_fx_flow(model_class, shape, gemm_path):
    torch.manual_seed(0)
    model = model_class().eval()
    via_fx, x = calibrated(model, shape)
    via_export, _ = calibrated(model, shape, prepare=fxp.prepare_pt2e)
    int_fx, out_fx = check_integer_model(model, via_fx, x, 0.99)
    int_export, out_export = check_integer_model(model, via_export, x, 0.99)
    assert int_fx.input_formats == int_export.input_formats and int_fx.output_scales == int_export.output_scales
    assert all(torch.equal(a, b) for a, b in zip(out_fx, out_export))


class HFTensor(nn.Module):
    """A Hugging Face model's tensor output ``field`` (its forward returns a ModelOutput)."""

    def __init__(self, model, field: str = "last_hidden_state"):
        super().__init__()
        self.model, self.field = model, field

    def forward(self, pixel_values):
        return getattr(self.model(pixel_values=pixel_values), self.field)


@needs_transformers
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_hugging_face_vit_becomes_integer_only(attention):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                       image_size=32, patch_size=8, attn_implementation=attention)
    model = HFTensor(ViTModel(config, add_pooling_layer=False)).eval()
    prepared, x = calibrated(model, (2, 3, 32, 32), prepare=fxp.prepare_pt2e)
    check_integer_model(model, prepared, x, 0.999)


@needs_transformers
def test_hugging_face_dinov2_with_layer_scale_and_resized_positions():
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=28,
                          patch_size=14, layerscale_value=0.5)
    model = HFTensor(Dinov2Model(config)).eval()  # 56 px: bicubic position embeddings, folded at conversion
    prepared, x = calibrated(model, (2, 3, 56, 56), prepare=fxp.prepare_pt2e)
    check_integer_model(model, prepared, x, 0.999)


def _mmseg_segmenter():
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules()
    backbone = dict(type="VisionTransformer", img_size=(32, 32), patch_size=8, embed_dims=64, num_layers=2,
                    num_heads=4, mlp_ratio=2, out_indices=(1,), final_norm=True, interpolate_mode="bicubic")
    head = dict(type="SegmenterMaskTransformerHead", in_channels=64, channels=64, num_classes=5, num_layers=1,
                num_heads=4, embed_dims=64, dropout_ratio=0.0, loss_decode=dict(type="CrossEntropyLoss"))
    return MODELS.build(dict(type="EncoderDecoder", backbone=backbone, decode_head=head)).eval()


def test_mmseg_stock_vit_and_segmenter_head_through_torch_export():
    torch.manual_seed(0)
    segmentor = _mmseg_segmenter()
    with pytest.raises(fxp.FxTraceError, match=r"(?s)'backbone.patch_embed.adap_padding' \(AdaptivePadding\).*prepare_pt2e"):
        fxp.prepare(segmentor, (torch.randn(2, 3, 32, 32),))
    prepared, x = calibrated(segmentor, (2, 3, 32, 32), prepare=fxp.prepare_pt2e)
    logits_model = fxp.traceable(segmentor)
    int_model, (logits,) = check_integer_model(logits_model, prepared, x, 0.995)
    with torch.no_grad():
        float_logits = logits_model(x)
    assert logits.shape == float_logits.shape == (2, 5, 4, 4)
    assert (logits.argmax(1) == float_logits.argmax(1)).float().mean() >= 0.9


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason=(
    "timm is not installed: it imports torchvision, and torchvision 0.28.0 does not load against torch "
    "2.13.0+cpu (RuntimeError: operator torchvision::nms does not exist)"))
def test_timm_vit_becomes_integer_only():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=5)
    prepared, x = calibrated(model.eval(), (2, 3, 32, 32), prepare=fxp.prepare_pt2e)
    check_integer_model(model, prepared, x, 0.99)


def test_attention_decomposition_is_exact_and_keeps_real_masks():
    class Attend(nn.Module):
        def forward(self, q, k, v):
            return (F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 5, dtype=torch.bool)),
                    F.scaled_dot_product_attention(q, k, v, scale=0.3),
                    F.scaled_dot_product_attention(q, k, v, is_causal=True))

    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    exported = torch.export.export(Attend(), (q, k, v)).module(check_guards=False)
    decomposed = decompose_attention(exported)
    kept = [n for n in decomposed.graph.nodes if n.target == torch.ops.aten.scaled_dot_product_attention.default]
    assert len(kept) == 1  # the causal one; the all-True mask and the explicit scale are decomposed
    for a, b in zip(decomposed(q, k, v), Attend()(q, k, v)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_causal_attention_is_refused_with_its_node():
    class Causal(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 48)

        def forward(self, x):
            q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    prepared, x = calibrated(Causal(), (2, 5, 16), prepare=fxp.prepare_pt2e)
    with pytest.raises(fxp.LoweringError, match=r"(?s)scaled_dot_product_attention.*test_pt2e.py.*is_causal=True"):
        fxp.convert(prepared, (x,))


def test_l2_normalize_is_found_again_in_the_exported_graph():
    class Normalise(nn.Module):
        def forward(self, x):
            return F.normalize(x, dim=-1) * 3

    x = torch.randn(2, 4, 6)
    gm = fuse_l2_normalize(torch.export.export(Normalise(), (x,)).module(check_guards=False))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert F.normalize in targets and torch.ops.aten.linalg_vector_norm.default not in targets
    torch.testing.assert_close(gm(x), Normalise()(x))


def test_the_pt2e_model_runs_only_integer_ops_on_uint8_pixels():
    torch.manual_seed(0)
    model = HandViT().eval()
    prepared, x = calibrated(model, (2, 3, 32, 32), prepare=fxp.prepare_pt2e)
    norm = dict(mean=(120.0, 115.0, 100.0), std=(60.0, 60.0, 60.0))
    int_model = fxp.convert(prepared, (x,), pixels=norm)
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad(), OpAudit() as audit:
        out = int_model(pixels)
    assert audit.float_ops() == [] and not out.dtype.is_floating_point
    mean, std = torch.tensor(norm["mean"]).view(1, 3, 1, 1), torch.tensor(norm["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = model((pixels.float() - mean) / std)
    assert cosine(dequantized(int_model, out)[0], ref) > 0.98


@pytest.mark.skipif(importlib.util.find_spec("skimage") is None,
                    reason="scikit-image's photos are not installed: `make test` installs them")
def test_the_quantize_your_vit_example_runs(monkeypatch, capsys):
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "examples" / "quantize_your_vit.py"
    monkeypatch.setattr("sys.argv", [str(script), "--size", "32"])
    runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out
    assert printed.count(", 0 of them float") == 2 and "MyViT refused: node 'scaled_dot_product_attention'" in printed
    assert "same integers: True" in printed


def _readme_pt2e(model, shape, batches=3, seed=0):
    """The README's PT2E route: torch.export -> torchao's prepare_pt2e(ISegQuantizer()) -> calibrate (convert: the
    caller's)."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    g = torch.Generator().manual_seed(seed)
    example = torch.randn(*shape, generator=g)
    exported = torch.export.export(model.eval(), (example,)).module()
    prepared = prepare_pt2e(exported, fxp.ISegQuantizer())
    with torch.no_grad():
        for _ in range(batches):
            prepared(torch.randn(*shape, generator=g))
    return prepared, example


def _tiny_beit(attention):
    from transformers import BeitConfig, BeitModel

    torch.manual_seed(0)
    config = BeitConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                        patch_size=8, use_relative_position_bias=True, attn_implementation=attention)
    model = BeitModel(config, add_pooling_layer=False)
    with torch.no_grad():  # (initialised to zero: a bias that masks nothing would not test the mask)
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_(0.0, 1.0)
    return HFTensor(model).eval()


@needs_transformers
def test_hugging_face_beit_relative_position_bias_through_the_readme_pt2e_route():
    """BEiT's relative position bias is SDPA's additive float mask under "sdpa" (prepare_pt2e crashed on it: issue
    39): folded as a constant added to the scaled scores, as "eager" writes it. (Not the same integers as "eager":
    Hugging Face's sdpa mask is the bias plus its all-True boolean mask, i.e. bias + 1, which moves the observed
    range of the scores; softmax does not see the shift.)"""
    outputs = {}
    for attention in ("eager", "sdpa"):
        model = _tiny_beit(attention)
        prepared, x = _readme_pt2e(model, (2, 3, 32, 32))
        if attention == "sdpa":
            targets = {n.target for n in prepared.graph.nodes}
            assert torch.ops.aten.scaled_dot_product_attention.default not in targets
        int_model, outputs[attention] = check_integer_model(model, prepared, x, 0.99)
    for a, b in zip(outputs["eager"], outputs["sdpa"]):
        assert (a.long() - b.long()).abs().max() <= 4 and a.abs().max() > 1000


def test_attention_masks_without_an_integer_lowering_are_refused_with_the_reason():
    class Masked(nn.Module):
        def __init__(self, mask):
            super().__init__()
            self.qkv = nn.Linear(16, 48)
            self.mask = mask

        def forward(self, x):
            q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
            mask = self.mask(x) if callable(self.mask) else self.mask
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    boolean = torch.ones(5, 5, dtype=torch.bool).tril()
    padding = torch.zeros(5, 5).masked_fill(~boolean, float("-inf"))
    for mask, why in [(boolean, "boolean attn_mask masks positions out"),
                      (padding, r"masking constants \(largest magnitude inf\)"),
                      (lambda x: x[..., :5].unsqueeze(1), "attn_mask depends on the model's input")]:
        prepared, x = calibrated(Masked(mask), (2, 5, 16), prepare=fxp.prepare_pt2e)
        with pytest.raises(fxp.LoweringError, match=rf"(?s)node 'scaled_dot_product_attention'.*test_pt2e.py.*{why}"):
            fxp.convert(prepared, (x,))


TorchEncoderViT = families_harness().TorchEncoderViT  # (one model: the families harness's torch-encoder)


def test_torch_transformer_encoder_layers_keep_their_contiguous_before_view():
    """nn.MultiheadAttention makes its q, k, v ``.contiguous()`` before a ``view``: dropped as an identity, the converted
    model failed on its first call (view size is not compatible with input tensor's size and stride: issue 39)."""
    torch.manual_seed(0)
    model = TorchEncoderViT().eval()
    prepared, x = _readme_pt2e(model, (2, 3, 32, 32))
    assert torch.ops.aten.contiguous.default in {n.target for n in prepared.graph.nodes}
    check_integer_model(model, prepared, x, 0.99)


@pytest.mark.parametrize("prepare", [fxp.prepare, fxp.prepare_pt2e], ids=["fx", "pt2e"])
def test_contiguous_copies_before_a_view_run_on_the_integers(prepare):
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            y = self.fc(x).unflatten(-1, (2, 8)).transpose(1, 2)
            b, h, n, d = y.shape
            return y.contiguous().view(b, h * n * d) + y.clone(memory_format=torch.contiguous_format).view(b, -1)

    torch.manual_seed(0)
    model = Heads().eval()
    prepared, x = calibrated(model, (2, 5, 16), prepare=prepare)
    check_integer_model(model, prepared, x, 0.99, min_ops=5)

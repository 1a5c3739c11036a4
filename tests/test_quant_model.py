"""ISegmenter(quant=...): the per-op lowering of the float Segmenter, calibrated by hooks, trained on its
own integer arithmetic (QAT) and evaluated as the deployed integer-only model."""
import pytest
import torch
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample

import iseg_plugin  # noqa: F401
from iseg_plugin.deploy import OpAudit
from iseg_plugin.lowering import LoweringError
from iseg_plugin.mmseg import calibrate
from iseg_plugin.ops import UnknownVariantError

from test_models_mmseg_compat import HEAD, PREPROC, VIT


def trained_like(model, seed=3):
    """mmseg's initialisation plus a spread in norms and biases, like a trained network's."""
    torch.manual_seed(seed)  # every parameter is re-drawn below, whatever the RNG state at build time
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("norm.weight"):
                p.mul_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.add_(0.05 * torch.randn_like(p))
    return model


def build(quant, **head_extra):
    cfg = dict(type="ISegmenter", quant=quant, data_preprocessor=dict(PREPROC, size=(64, 64)),
               backbone=dict(VIT, type="IVisionTransformer"),
               decode_head=dict(HEAD, type="ISegmenterMaskHead", drop_path_rate=0.0,
                                **{"l2_norm": False, "upsample": "nearest", **head_extra}),
               test_cfg=dict(mode="whole"))
    return MODELS.build(cfg)


def images(n=2, seed=0):
    """Normalised images whose pixels are integers, as mmseg's data preprocessor makes them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 64, 64, generator=g)
    x[:, :, :, 32:] = x[:, :, :, 32:] * 0.3  # some structure: bright left, dark right
    return (torch.round(x * 255) - 127.5) / 127.5


def loader(x):
    """One mmseg data batch of the images ``x`` (uint8 BGR pixels, as read from files)."""
    pixels = torch.round(x * 127.5 + 127.5).byte().flip(1)
    return [dict(inputs=list(pixels), data_samples=[SegDataSample() for _ in range(len(x))])]


def calibrated_pair(quant=None, **head_extra):
    float_model = trained_like(build(None, **head_extra))
    quant_model = build(quant or {}, **head_extra)
    missing = quant_model.load_state_dict(float_model.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("observers.") for k in missing)  # only the ranges are new
    calibrate(quant_model, loader(images(4, seed=1)), num_samples=4, show_progress=False)
    return float_model.eval(), quant_model.eval()


def labelled(n, label):
    return [SegDataSample(gt_sem_seg=PixelData(data=label), metainfo=dict(img_shape=(64, 64), pad_shape=(64, 64)))
            for _ in range(n)]


@pytest.mark.parametrize("quant", [{}, {"gelu": "lambda-shift", "softmax": "shift"}, {"gelu": "shift"}])
def test_quantized_model_agrees_with_float(quant):
    float_model, quant_model = calibrated_pair(quant)
    x = images(2, seed=5)
    with torch.no_grad():
        ref, out = float_model._forward(x), quant_model._forward(x)
    # random 7-class masks are near ties after mask_norm, so the relative error of the logits is large-ish
    assert (out - ref).norm() / ref.norm() < 0.25
    assert (ref.argmax(1) == out.argmax(1)).float().mean() > 0.7


def test_evaluation_runs_the_deployed_integer_only_model():
    _, model = calibrated_pair({"gelu": "lambda-shift"})
    deployed = model.deploy((64, 64))
    pixels = torch.round(images(1, seed=7) * 127.5 + 127.5).byte()
    with torch.no_grad(), OpAudit() as audit:
        logits, _ = deployed(pixels)
    assert audit.float_ops() == []
    assert not logits.dtype.is_floating_point
    with torch.no_grad():
        assert torch.equal(model._forward(images(1, seed=7)), (logits.double() * deployed.logit_scale).float())


def test_training_form_gives_the_deployed_integers():
    """One arithmetic: the QAT forward (float64 holding integers) and the deployed one agree exactly."""
    _, model = calibrated_pair({"gelu": "poly", "softmax": "bit-exp"}, l2_norm=True, upsample="bilinear")
    x = images(2, seed=8)
    with torch.no_grad():
        deployed = model.integer_logits(x)
    model.train()
    trained = model.integer_logits(x)
    assert trained.requires_grad
    assert torch.equal(trained.detach(), deployed)


def test_decoder_with_integer_bilinear_and_l2():
    float_model, quant_model = calibrated_pair(l2_norm=True, upsample="bilinear")
    x = images(2, seed=8)
    with torch.no_grad():
        ref, out = float_model._forward(x), quant_model._forward(x)
    assert out.shape == ref.shape == (2, 7, 64, 64)
    assert (ref.argmax(1) == out.argmax(1)).float().mean() > 0.8


def test_uncalibrated_model_says_so():
    model = build({}).eval()
    with pytest.raises(LoweringError, match="saw no data; calibrate"):
        model._forward(images(1))


def test_qat_gradients_reach_every_kind_of_parameter():
    _, model = calibrated_pair()
    model.train()
    loss = model.loss(images(2), labelled(2, torch.randint(0, 7, (1, 64, 64))))["decode.loss_ce"]
    assert torch.isfinite(loss)
    loss.backward()
    for name in ("backbone.layers.0.attn.qkv.weight", "backbone.layers.0.norm1.weight", "backbone.pos_embed",
                 "backbone.cls_token", "backbone.patch_embed.projection.weight", "decode_head.cls_emb",
                 "decode_head.mask_norm.bias"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_qat_loss_goes_down_on_a_fixed_batch():
    _, model = calibrated_pair()
    model.train()
    x = images(2, seed=9)
    label = torch.zeros(1, 64, 64, dtype=torch.long)
    label[..., 32:] = 3
    samples = labelled(2, label)
    opt = torch.optim.SGD(model.parameters(), lr=0.003, momentum=0.9)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = model.loss(x, samples)["decode.loss_ce"]
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses


def test_qat_warm_up_moves_the_ranges_and_freezing_stops_them():
    _, model = calibrated_pair()
    observer = next(iter(model.observers.values()))
    model.train()
    before = float(observer.max_val)
    model.observe_in_training = True
    model.integer_logits(images(2, seed=10) * 0.2)  # darker images: the input range shrinks
    moved = float(observer.max_val)
    assert moved < before
    model.observe_in_training = False
    model.integer_logits(images(2, seed=11) * 0.2)
    assert float(observer.max_val) == moved


def test_observer_ranges_travel_with_the_state_dict():
    _, model = calibrated_pair({"gelu": "poly"})
    fresh = build({"gelu": "poly"})
    fresh.load_state_dict(model.state_dict())  # strict: the same keys
    fresh.eval()
    x = images(1, seed=11)
    with torch.no_grad():
        assert torch.equal(fresh._forward(x), model._forward(x))


def test_integer_model_has_no_dropout_or_drop_path():
    with pytest.raises(ValueError, match="no dropout or drop-path"):
        MODELS.build(dict(type="ISegmenter", quant={}, data_preprocessor=PREPROC,
                          backbone=dict(VIT, type="IVisionTransformer", drop_path_rate=0.1),
                          decode_head=dict(HEAD, type="ISegmenterMaskHead", drop_path_rate=0.0)))


def test_bad_quant_options_are_refused():
    with pytest.raises(UnknownVariantError, match="known: lambda-shift, poly, shift"):
        build({"gelu": "relu"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['scores_bits'\]"):
        build({"scores_bits": 8})


def test_calibration_with_empty_loader_is_refused():
    model = build({})
    with pytest.raises(ValueError, match="calibration set is empty"):
        calibrate(model, [], num_samples=1, show_progress=False)
    with pytest.raises(ValueError, match="num_samples"):
        calibrate(model, [], num_samples=0, show_progress=False)
    with pytest.raises(ValueError, match="build ISegmenter with quant"):
        calibrate(build(None), loader(images(1)), num_samples=1, show_progress=False)

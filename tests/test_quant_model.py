"""The quantized I-Segmenter: integer-exact in eval, trainable (QAT), calibrated by hooks."""
import pytest
import torch
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample
from mmengine.structures import PixelData

import iseg_plugin  # noqa: F401
from iseg_plugin.mmseg import calibrate
from iseg_plugin.quant import NotCalibratedError, QTensor, QuantAct, observers, set_observing

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
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 64, 64, generator=g)
    x[:, :, :, 32:] = x[:, :, :, 32:] * 0.3  # some structure: bright left, dark right
    return x * 2 - 1


def calibrated_pair(quant=None, **head_extra):
    float_model = build(None, **head_extra)
    trained_like(float_model)
    quant_model = build(quant or {}, **head_extra)
    quant_model.load_state_dict(float_model.state_dict(), strict=False)
    quant_model.eval()
    float_model.eval()
    with torch.no_grad():
        quant_model._forward(images(4, seed=1))  # calibration batch (observers on by default)
    set_observing(quant_model, False)
    return float_model, quant_model


@pytest.mark.parametrize("quant", [{}, {"gelu": "poly"}, {"softmax": "bit-exp"}, {"gelu": "shift"}])
def test_quantized_model_agrees_with_float(quant):
    float_model, quant_model = build(None), build(quant)
    trained_like(float_model)
    quant_model.load_state_dict(float_model.state_dict(), strict=False)
    float_model.eval()
    calibrate(quant_model, [dict(inputs=list((images(4, seed=1) * 127.5 + 127.5).byte()),
                                 data_samples=[SegDataSample() for _ in range(4)])], num_samples=4,
              show_progress=False)
    x = images(2, seed=5)
    with torch.no_grad():
        feats = float_model.backbone(x)[0]
        feats_q = quant_model.backbone(x)[0].dequantize().float()
        ref, out = float_model._forward(x), quant_model._forward(x)
    assert (feats_q - feats).norm() / feats.norm() < 0.03  # encoder: INT8/INT16 all the way through
    # random 7-class masks are near ties after mask_norm, so the head's relative error is larger
    assert (out - ref).norm() / ref.norm() < 0.25
    assert (ref.argmax(1) == out.argmax(1)).float().mean() > 0.7
    assert torch.isfinite(out).all()


def test_eval_forward_is_integer_exact():
    _, model = calibrated_pair({"gelu": "lambda-shift"})
    with torch.no_grad():
        feats = model.backbone(images(1, seed=7))
        logits = model.decode_head.forward_quant(feats)
    for q in (feats[0], logits):
        assert isinstance(q, QTensor)
        assert q.value.dtype == torch.float64  # eval GEMMs in float64: exact INT32 accumulators
        assert torch.equal(q.value, q.value.round())
    assert feats[0].value.abs().max() <= 128
    assert logits.value.abs().max() <= 2**15


def test_decoder_with_integer_bilinear_and_l2():
    float_model, quant_model = calibrated_pair(l2_norm=True, upsample="bilinear")
    assert hasattr(quant_model.decode_head, "patch_l2_act")
    x = images(2, seed=8)
    with torch.no_grad():
        ref, out = float_model._forward(x), quant_model._forward(x)
    assert out.shape == ref.shape == (2, 7, 64, 64)
    assert (ref.argmax(1) == out.argmax(1)).float().mean() > 0.8


def test_uncalibrated_model_says_so():
    model = build({})
    model.eval()
    set_observing(model, False)
    with pytest.raises(NotCalibratedError, match="calibrate the model"):
        model._forward(images(1))


def test_qat_gradients_reach_every_kind_of_parameter():
    _, model = calibrated_pair()
    model.train()
    samples = [SegDataSample(gt_sem_seg=PixelData(data=torch.randint(0, 7, (1, 64, 64))),
                             metainfo=dict(img_shape=(64, 64), pad_shape=(64, 64))) for _ in range(2)]
    loss = model.loss(images(2), samples)["decode.loss_ce"]
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
    samples = [SegDataSample(gt_sem_seg=PixelData(data=label), metainfo=dict(img_shape=(64, 64),
                                                                             pad_shape=(64, 64)))] * 2
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


def test_observer_ranges_and_flags_travel_with_the_state_dict():
    _, model = calibrated_pair({"gelu": "poly"})
    state = model.state_dict()
    fresh = build({"gelu": "poly"})
    fresh.load_state_dict(state)
    fresh.eval()
    x = images(1, seed=11)
    with torch.no_grad():
        assert torch.equal(fresh._forward(x), model._forward(x))
    assert all(not bool(m.observing) for m in observers(fresh))


def test_integer_model_has_no_dropout_or_drop_path():
    with pytest.raises(ValueError, match="drop"):
        MODELS.build(dict(type="ISegmenter", quant={}, data_preprocessor=PREPROC,
                          backbone=dict(VIT, type="IVisionTransformer", drop_path_rate=0.1),
                          decode_head=dict(HEAD, type="ISegmenterMaskHead", drop_path_rate=0.0)))


def test_bad_quant_options_are_refused():
    with pytest.raises(ValueError, match="quant.gelu"):
        build({"gelu": "relu"})


def test_calibration_with_empty_loader_is_refused():
    model = build({})
    with pytest.raises(ValueError, match="calibration set is empty"):
        calibrate(model, [], num_samples=1, show_progress=False)
    with pytest.raises(ValueError, match="num_samples"):
        calibrate(model, [], num_samples=0, show_progress=False)


def test_asymmetric_activation_grid_uses_all_256_levels():
    act = QuantAct(8, asymmetric=True)
    gelu_like = torch.tensor([-0.17, 0.0, 0.5, 10.03])
    act(gelu_like)
    assert act.scale().item() == pytest.approx(0.04) and act.bounds() == (-4, 251)
    act.observing.fill_(False)
    # integers of scale 0.02 requantized onto the grid (0.06 / 0.04 = 1.5 -> 2), clamped at its ends
    out = act(QTensor(torch.tensor([-100.0, 0.0, 3.0, 1000.0]), torch.tensor(0.02)))
    assert out.value.tolist() == [-4.0, 0.0, 2.0, 251.0]

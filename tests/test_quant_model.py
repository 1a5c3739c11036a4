"""ISegmenter(quant=...): the per-op lowering of the float Segmenter, calibrated by hooks, trained on its
own integer arithmetic (QAT) and evaluated as the deployed integer-only model."""
import pytest
import torch
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample

import iseg_plugin.mmseg  # noqa: F401
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


def build(quant, distill=None, **head_extra):
    cfg = dict(type="ISegmenter", quant=quant, distill=distill, data_preprocessor=dict(PREPROC, size=(64, 64)),
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


def calibrated_pair(quant=None, distill=None, **head_extra):
    float_model = trained_like(build(None, **head_extra))
    quant_model = build(quant or {}, distill, **head_extra)
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


def sgd_steps(model, x, samples, loss_name: str, lr: float, steps: int = 8) -> list[float]:
    """The loss ``loss_name`` at each of ``steps`` SGD steps (momentum 0.9) on one batch."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model.loss(x, samples)[loss_name]
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


def test_qat_loss_goes_down_on_a_fixed_batch():
    _, model = calibrated_pair()
    model.train()
    x = images(2, seed=9)
    label = torch.zeros(1, 64, 64, dtype=torch.long)
    label[..., 32:] = 3
    losses = sgd_steps(model, x, labelled(2, label), "decode.loss_ce", lr=0.003)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("class_weight", [None, [1.0, 4.0, 0.5, 1.0, 2.0, 1.0, 0.25]])
def test_distillation_loss_is_the_kl_from_the_float_model_at_the_start(class_weight):
    float_model, model = calibrated_pair(distill=dict(weight=2.0, temperature=3.0, class_weight=class_weight))
    model.train()
    x = images(2, seed=4)
    label = torch.randint(0, 7, (1, 64, 64))
    label[..., 32:] = 1  # the dark half is one class: a class weight then changes the loss
    label[..., :8, :] = 255  # ignored pixels are left out
    losses = model.loss(x, labelled(2, label))
    with torch.no_grad():
        student, teacher = model.integer_logits(x), float_model._forward(x)
    p_teacher = torch.softmax(teacher.double() / 3, 1)
    kl = (p_teacher * (p_teacher.log() - torch.log_softmax(student.double() / 3, 1))).sum(1)
    # the head's logits are at the label size here; each labelled pixel weighs its label's class weight
    w = torch.ones(64, 64, dtype=torch.float64)
    if class_weight is not None:
        w = torch.tensor(class_weight, dtype=torch.float64)[label[0].clamp(max=6)]
    w[:8] = 0
    expected = 2.0 * 9 * (kl * w).sum() / (2 * w.sum())
    assert float(losses["decode.loss_kd"]) == pytest.approx(float(expected), rel=1e-4)
    assert float(expected) > 0 and "decode.loss_ce" in losses
    if class_weight is not None:  # the weights change the loss: the unweighted mean is not it
        assert float(losses["decode.loss_kd"]) != pytest.approx(float(2.0 * 9 * kl[:, 8:, :].mean()), rel=1e-2)


def test_distillation_teacher_is_frozen_at_the_first_step_and_trains_the_student():
    float_model, model = calibrated_pair(distill=dict())
    model.train()
    x = images(2, seed=5)
    # SGD: Adam's first steps (every weight moved by the learning rate) raise this loss at any rate tried
    losses = sgd_steps(model, x, labelled(2, torch.randint(0, 7, (1, 64, 64))), "decode.loss_kd", lr=1e-4)
    assert sum(losses[-4:]) / 4 < 0.7 * losses[0], losses
    assert not any(p.requires_grad for p in model._teacher.parameters())
    assert "_teacher" not in dict(model.named_children())  # neither trained nor saved
    with torch.no_grad():  # the teacher is still the float model the student started from
        assert torch.allclose(model._teacher(x), float_model._forward(x), atol=1e-4)
        assert not torch.allclose(model.decode_head.cls_emb, float_model.decode_head.cls_emb)


def test_distillation_teacher_is_the_float_model_from_before_gptq_rounds_the_trained_weights():
    """At W4A8 the calibration for QAT sets the trained weights to GPTQ's integers times its scales; the
    teacher is the float model from before that."""
    float_model = trained_like(build(None))
    model = build({"weight_bits": 4}, dict())
    model.load_state_dict(float_model.state_dict(), strict=False)
    calibrate(model, loader(images(4, seed=1)), num_samples=4, show_progress=False, for_training=True)
    float_model.eval()
    assert not torch.equal(model.decode_head.dec_proj.weight, float_model.decode_head.dec_proj.weight)
    x = images(2, seed=5)
    model.train()
    model.loss(x, labelled(2, torch.randint(0, 7, (1, 64, 64))))  # the first training step
    with torch.no_grad():
        assert torch.allclose(model._teacher(x), float_model._forward(x), atol=1e-5)


def test_diverged_qat_weights_are_named_as_the_cause():
    _, model = calibrated_pair()
    model.train()
    with torch.no_grad():
        model.decode_head.dec_proj.weight.mul_(1e15)  # what a diverged step leaves
    with pytest.raises(RuntimeError, match="the weights have diverged: lower the learning rate"):
        model.loss(images(2, seed=6), labelled(2, torch.randint(0, 7, (1, 64, 64))))


def test_bad_distill_options_are_refused():
    with pytest.raises(ValueError, match="not \\['alpha'\\]"):
        build({}, distill=dict(alpha=0.5))
    with pytest.raises(ValueError, match="must be positive"):
        build({}, distill=dict(temperature=0))
    with pytest.raises(ValueError, match="one positive weight per class \\(7\\)"):
        build({}, distill=dict(class_weight=[1.0] * 6))
    with pytest.raises(ValueError, match="one positive weight per class"):
        build({}, distill=dict(class_weight=[1.0] * 6 + [0.0]))
    with pytest.raises(ValueError, match="is for QAT"):
        build(None, distill=dict())


def test_qat_warm_up_moves_the_ranges_and_freezing_stops_them():
    _, model = calibrated_pair()
    observer = next(iter(model.observers.values()))
    model.train()
    before = float(observer.max_val)
    model.set_momentum(0.01)  # the QATHook's warm-up: an EMA of the training batches' ranges
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

"""Grids cover the calibration (issue 39): every value's range is the extremes of every calibration value, in
whatever order the batches come (the paper's EMA range stays near the first batch's over a few batches and clipped
the values of later ones), and the model's output is on a grid covering them with one spare bit."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fx_patterns as fxp
from iseg_plugin.deploy import OpAudit
from iseg_plugin.ops import IsegObserver

from test_fx_per_op import HandViT, calibrated, cosine, dequantized
from test_pt2e import HFTensor

needs_photos = pytest.mark.skipif(importlib.util.find_spec("skimage") is None or importlib.util.find_spec(
    "transformers") is None, reason="scikit-image's photos and transformers: `make test` installs them")

# 14 of the photos in scikit-image's wheel (the grey ones as RGB)
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg",
          "ihc.png", "retina.jpg", "brick.png", "grass.png", "gravel.png", "camera.png", "coins.png", "moon.png")


def _photos(size):
    from PIL import Image

    folder = Path(importlib.util.find_spec("skimage").submodule_search_locations[0]) / "data"
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return [((torch.from_numpy(np.asarray(Image.open(folder / name).convert("RGB").resize((size, size))))
              .permute(2, 0, 1)[None] / 255.0) - mean) / std for name in PHOTOS]


@needs_photos
@pytest.mark.parametrize("kind", ["deit", "vit"])
def test_classifier_logits_do_not_saturate_on_the_calibration_photos(kind):
    """A DeiT classifier (its output: (class logits + distillation logits) / 2) and a ViT classifier calibrated one
    photo per batch: none of their INT16 logits on those photos is at the grid's limits (before: 0.21 % and 1.07 %)."""
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher, ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                 patch_size=8, num_labels=100)
    model = (DeiTForImageClassificationWithTeacher(DeiTConfig(**sizes)) if kind == "deit"
             else ViTForImageClassification(ViTConfig(**sizes)))
    model = HFTensor(model, "logits").eval()
    photos = _photos(32)
    prepared = fxp.prepare_pt2e(model, (photos[0],))
    with torch.no_grad():
        for x in photos:
            prepared(x)
    int_model = fxp.convert(prepared, (photos[0],))
    inputs = [fxp.quantize_inputs(int_model, x) for x in photos]
    with torch.no_grad(), OpAudit() as audit:
        logits = torch.cat([int_model(*x) for x in inputs])
    with torch.no_grad():
        ref = torch.cat([model(x) for x in photos])
    assert logits.dtype == torch.int16 and audit.float_ops() == []
    at_limits = float(((logits >= 32767) | (logits <= -32767)).double().mean())
    assert at_limits == 0.0
    assert logits.abs().max() > 8192  # the grid is used: the largest logit is within one bit (+ error) of its top
    assert cosine(dequantized(int_model, logits)[0], ref) > 0.95


def _observers(prepared):
    return {n.args[0].name: prepared.get_submodule(n.target) for n in prepared.graph.nodes
            if n.op == "call_module" and isinstance(prepared.get_submodule(n.target), IsegObserver)}


def test_every_grid_covers_every_calibration_batch_in_any_order():
    """Calibrated on three batches and a three times wider one, in either order: the same ranges, and the integer
    model is as close to the float model on every batch. The paper's EMA (update 0.05) in the same order keeps the
    first batches' ranges and clips the wider batch's values (cosine 0.983 on it)."""
    torch.manual_seed(0)
    model = HandViT(dim=32, heads=2).eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 3, 32, 32, generator=g) * amplitude for amplitude in (1.0, 1.0, 1.0, 3.0)]

    def calibrated_on(order, **options):
        prepared = fxp.prepare(model, (batches[0],), **options)
        with torch.no_grad():
            for x in order:
                prepared(x)
        int_model = fxp.convert(prepared, (batches[0],))
        with torch.no_grad():
            cosines = [cosine(dequantized(int_model, int_model(*fxp.quantize_inputs(int_model, x)))[0], model(x))
                       for x in batches]
        return {name: (float(o.min_val), float(o.max_val)) for name, o in _observers(prepared).items()}, cosines

    ranges, cosines = calibrated_on(batches)
    assert (ranges, cosines) == calibrated_on(batches[::-1])
    assert min(cosines) > 0.999
    assert calibrated_on(batches, momentum=0.05)[1][-1] < 0.99


def test_output_grid_covers_every_calibration_value_with_headroom():
    torch.manual_seed(0)
    model = HandViT(dim=32, heads=2).eval()
    prepared, x = calibrated(model, (2, 3, 32, 32), batches=4)
    observers = _observers(prepared)
    head = observers["head"]
    lo, hi = (float(v) for v in head.covering_range())
    assert (lo, hi) == (float(head.min_val), float(head.max_val))  # the range: every value seen
    int_model = fxp.convert(prepared, (x,))
    assert int_model.output_scales[0] == head.covering_scale(16) == pytest.approx(2 * max(-lo, hi) / 32767, rel=1e-6)
    mean = observers["mean"]  # an internal value (the head's input, INT8): its range, no headroom
    assert int_model.graph_module.head.out.multiplier.numel()
    assert mean.covering_scale(8) == pytest.approx(2 * mean.scale(8), rel=1e-6)

    # a record written before the extremes were kept: the grid of its range, as it was
    state = {k: v for k, v in prepared.state_dict().items() if not k.split(".")[-1].startswith("seen_")}
    prepared.load_state_dict(state)
    assert head.seen_min.numel() == 0
    assert fxp.convert(prepared, (x,)).output_scales[0] == head.scale(16)


def test_the_output_grid_reaches_through_shape_ops_resizes_and_scalar_products():
    """The value that decides the output's integers is found through the ops that keep them (FX: an observer after a
    shape op; a resize; a product with a number), and only that one gets the covering grid."""
    class Tail(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 16)

        def forward(self, x):
            y = self.fc(x).transpose(1, 2).reshape(2, 16, 2, 2)
            return nn.functional.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False) * 0.5

    torch.manual_seed(0)
    model = Tail().eval()
    for prepare in (fxp.prepare, fxp.prepare_pt2e):
        prepared, x = calibrated(model, (2, 4, 8), batches=4, prepare=prepare)
        fc = next(prepared.get_submodule(n.target) for n in prepared.graph.nodes if n.op == "call_module"
                  and isinstance(prepared.get_submodule(n.target), IsegObserver) and n.args[0].name in ("fc", "linear"))
        int_model = fxp.convert(prepared, (x,))
        assert int_model.output_scales[0] == pytest.approx(fc.covering_scale(16) * 0.5, rel=1e-12)
        assert fc.covering_scale(16) > fc.scale(16)

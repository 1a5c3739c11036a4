import torch

from iseg_plugin.models.fold import fold_layernorms

from test_quant_model import build, images, trained_like


def test_folding_layernorm_affines_keeps_the_float_model():
    model = trained_like(build(None))
    model.eval()
    x = images(2, seed=3)
    with torch.no_grad():
        before = model._forward(x)
        assert fold_layernorms(model) == 2 * (2 + 2) + 1  # two norms per encoder and decoder block, final norm
        after = model._forward(x)
    assert (after - before).abs().max() < 1e-4
    assert torch.equal(model.backbone.layers[0].norm1.weight, torch.ones(192))

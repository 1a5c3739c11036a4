"""The drop-in contract with mmseg 1.2.2's ``VisionTransformer`` and ``SegmenterMaskTransformerHead``:
the behaviours mmseg's own backbone and head tests check, on the plugin's classes. An option the
plugin does not implement raises NotImplementedError naming it; where mmseg asserts, the plugin
raises ValueError with the reason."""
import pytest
import torch

from iseg_plugin.models import ISegmenterMaskHead, IVisionTransformer

MISSING = "PATH_THAT_DOES_NOT_EXIST.pth"


@pytest.mark.parametrize("kwargs,error", [
    (dict(img_size=512.0), TypeError),
    (dict(img_size=(224, 224, 224)), ValueError),
    (dict(out_indices=1.0), TypeError),
    (dict(pretrained=123), TypeError),
    (dict(pretrained=MISSING, init_cfg=dict(type="Pretrained", checkpoint=MISSING)), ValueError),
    (dict(pretrained=MISSING, init_cfg=123), ValueError),
    (dict(with_cls_token=False, output_cls_token=True), NotImplementedError),
    (dict(with_cp=True), NotImplementedError),
    (dict(patch_norm=True), NotImplementedError),
    (dict(norm_eval=True), NotImplementedError),
])
def test_bad_or_unsupported_options_are_refused(kwargs, error):
    with pytest.raises(error) as raised:
        IVisionTransformer(**kwargs)
    assert str(raised.value)  # a message that says what is wrong


def test_resize_pos_embed_is_mmseg_s_static_method():
    pos = torch.randn(1, 1 + 14 * 14, 8)
    resized = IVisionTransformer.resize_pos_embed(pos, (16, 16), (14, 14), "bicubic")
    assert resized.shape == (1, 1 + 16 * 16, 8) and torch.equal(resized[:, 0], pos[:, 0])
    assert torch.allclose(IVisionTransformer.resize_pos_embed(pos, (14, 14), (14, 14), "bicubic"), pos, atol=1e-6)
    with pytest.raises(TypeError):  # mmseg's signature: (pos_embed, input_shape, pos_shape, mode)
        IVisionTransformer.resize_pos_embed(torch.randn(1, 196), 512, 512, 224, 224, "bilinear")


@pytest.mark.parametrize("img_size", [224, (224,), (224, 224), [224, 224]])
def test_img_size_forms(img_size):
    assert IVisionTransformer(img_size=img_size, num_layers=1).img_size == (224, 224)


@pytest.mark.parametrize("size,grid", [((224, 224), (14, 14)), ((256, 256), (16, 16)), ((32, 32), (2, 2)),
                                       ((112, 224), (7, 14)), ((234, 345), (15, 22))])
def test_feature_map_shapes(size, grid):
    torch.manual_seed(0)
    model = IVisionTransformer(num_layers=2, final_norm=True)
    model.init_weights()
    model.train()
    assert all(m.training for m in model.modules())
    with torch.no_grad():
        feats = model(torch.randn(1, 3, *size))
    assert feats[-1].shape == (1, 768, *grid)


def test_init_from_a_missing_or_malformed_source():
    assert IVisionTransformer(pretrained=None, init_cfg=None, num_layers=1).init_cfg is None
    for model in (IVisionTransformer(pretrained=MISSING, num_layers=1),
                  IVisionTransformer(init_cfg=dict(type="Pretrained", checkpoint=MISSING), num_layers=1)):
        assert model.init_cfg == dict(type="Pretrained", checkpoint=MISSING)
        with pytest.raises(OSError):
            model.init_weights()
    with pytest.raises(TypeError):
        IVisionTransformer(init_cfg=123, num_layers=1).init_weights()


def test_mask_head_output_at_the_feature_resolution():
    """mmseg's head returns masks at the features' resolution (EncoderDecoder resizes them); the
    plugin's head upsamples inside the model (``upsample_factor``, the encoder's patch size), so the
    drop-in call sets it to 1."""
    head = ISegmenterMaskHead(in_channels=2, channels=2, num_classes=150, num_layers=2, num_heads=3,
                              embed_dims=192, dropout_ratio=0.0, upsample_factor=1)
    head.init_weights()
    assert not [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]  # (mmseg: no conv without norm)
    with torch.no_grad():
        out = head([torch.randn(1, 2, 32, 32)])
    assert out.shape == (1, 150, 32, 32)
    upsampled = ISegmenterMaskHead(in_channels=2, channels=2, num_classes=150, num_layers=1, num_heads=3,
                                   embed_dims=192, dropout_ratio=0.0, upsample_factor=16)
    assert upsampled([torch.randn(1, 2, 4, 4)]).shape == (1, 150, 64, 64)

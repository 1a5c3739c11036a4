"""The float Segmenter is a drop-in for mmseg's: same arguments, keys, shapes and logits."""
import copy

import pytest
import torch
from mmengine.runner import load_checkpoint
from mmseg.models.backbones import VisionTransformer
from mmseg.models.decode_heads import SegmenterMaskTransformerHead
from mmseg.registry import MODELS
from torch import fx

import iseg_plugin.mmseg  # noqa: F401  (registers the plugin's modules)
from iseg_plugin.models import CheckpointMismatchError, ISegmenterMaskHead, IVisionTransformer

VIT = dict(img_size=(64, 64), patch_size=16, embed_dims=192, num_layers=2, num_heads=3, final_norm=True,
           norm_cfg=dict(type="LN", eps=1e-6), with_cls_token=True, interpolate_mode="bicubic")
HEAD = dict(in_channels=192, channels=192, num_classes=7, num_layers=2, num_heads=3, embed_dims=192,
            dropout_ratio=0.0, loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0))
PREPROC = dict(type="SegDataPreProcessor", mean=[127.5] * 3, std=[127.5] * 3, bgr_to_rgb=True, pad_val=0,
               seg_pad_val=255)


def randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


def segmentor(backbone_type, head_type, **head_extra):
    cfg = dict(type="EncoderDecoder" if backbone_type == "VisionTransformer" else "ISegmenter",
               data_preprocessor=PREPROC, backbone=dict(VIT, type=backbone_type),
               decode_head=dict(HEAD, type=head_type, **head_extra), test_cfg=dict(mode="whole"))
    model = MODELS.build(cfg)
    model.eval()
    return model


@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (1, 3, 50, 70)])  # 50x70: padded to 64x80 as mmseg
def test_backbone_matches_mmseg(shape):
    ref = randomize(VisionTransformer(**VIT))
    ref.eval()
    ours = IVisionTransformer(**VIT)
    result = ours.load_state_dict(ref.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    ours.eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        a, b = ref(x)[0], ours(x)[0]
    assert a.shape == b.shape
    assert (a - b).abs().max() <= 1e-4


@pytest.mark.parametrize("exclude", [["all"], [], ["norm", "pos_embed"]])
def test_frozen_exclude_as_in_mmseg(exclude):
    """mmseg's rule on the encoder's parameter names: frozen unless a name contains one of the strings."""
    model = IVisionTransformer(**VIT, frozen_exclude=exclude)
    names = [name for name, _ in model.named_parameters()]
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    expected = {"all": names, "": [], "norm": [n for n in names if "norm" in n or "pos_embed" in n]}
    assert trained == expected[exclude[0] if exclude else ""]
    assert 0 < len(expected["norm"]) < len(names)


def test_segmentor_logits_match_mmseg_end_to_end():
    ref = segmentor("VisionTransformer", "SegmenterMaskTransformerHead")
    randomize(ref, seed=1)
    ours = segmentor("IVisionTransformer", "ISegmenterMaskHead", l2_norm=True, upsample="bilinear")
    result = ours.load_state_dict(ref.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 3, 64, 64)
    meta = [dict(img_shape=(64, 64), ori_shape=(64, 64), pad_shape=(64, 64), padding_size=[0, 0, 0, 0])] * 2
    with torch.no_grad():
        a = ref.encode_decode(x, meta)
        b = ours.encode_decode(x, meta)
    assert a.shape == b.shape == (2, 7, 64, 64)
    assert (a - b).abs().max() <= 1e-4


def test_position_embedding_is_resized_at_load():
    ref = randomize(VisionTransformer(**VIT), seed=2)
    ref.eval()
    ours = IVisionTransformer(**dict(VIT, img_size=(96, 96)))  # a 6x6 grid; the checkpoint has 4x4
    ours.load_state_dict(ref.state_dict())
    ours.eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():  # mmseg resizes the 4x4 table at every forward, we once at load: same numbers
        assert (ref(x)[0] - ours(x)[0]).abs().max() <= 1e-4


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    small = IVisionTransformer(**VIT)
    big = IVisionTransformer(**dict(VIT, embed_dims=384, num_heads=6))
    with pytest.raises(CheckpointMismatchError, match="another architecture") as err:
        small.load_state_dict(big.state_dict())
    assert "has shape (384," in str(err.value)
    deeper = IVisionTransformer(**dict(VIT, num_layers=3))
    with pytest.raises(CheckpointMismatchError, match="unexpected key 'layers.2"):
        small.load_state_dict(deeper.state_dict())
    # through mmengine's loader too (what load_from / mim test use)
    path = tmp_path / "big.pth"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in big.state_dict().items()}}, path)
    model = segmentor("IVisionTransformer", "ISegmenterMaskHead")
    with pytest.raises(CheckpointMismatchError):
        load_checkpoint(model, str(path))


def test_head_checkpoint_with_other_num_classes_is_refused():
    head = ISegmenterMaskHead(**HEAD)
    other = ISegmenterMaskHead(**dict(HEAD, num_classes=150))
    with pytest.raises(CheckpointMismatchError, match="cls_emb"):
        head.load_state_dict(other.state_dict())


def test_fx_symbolic_trace():
    vit = randomize(IVisionTransformer(**VIT))
    vit.eval()
    traced = fx.symbolic_trace(vit)
    ops = {n.target for n in traced.graph.nodes if n.op == "call_function"}
    assert torch.matmul in ops
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(traced(x)[0], vit(x)[0])
    head = ISegmenterMaskHead(**HEAD)
    head.eval()
    traced_head = fx.symbolic_trace(head)
    feats = (torch.randn(1, 192, 4, 4),)
    assert torch.equal(traced_head(feats), head(feats))


def test_decoder_options():
    head = ISegmenterMaskHead(**dict(HEAD, l2_norm=False, upsample="nearest"))
    head.eval()
    out = head((torch.randn(1, 192, 4, 4),))
    assert out.shape == (1, 7, 64, 64)
    assert torch.equal(out[..., ::16, ::16], out[..., 15::16, 15::16])  # nearest: 16x16 constant blocks
    with pytest.raises(ValueError, match="upsample"):
        ISegmenterMaskHead(**dict(HEAD, upsample="bicubic"))


def test_stock_mmseg_segmenter_config_builds_with_plugin_types():
    from pathlib import Path

    import mmseg
    from mmengine.config import Config

    stock = Path(mmseg.__file__).parent / ".mim/configs/segmenter/segmenter_vit-t_mask_8xb1-160k_ade20k-512x512.py"
    cfg = Config.fromfile(stock)
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.update(type="ISegmenter", pretrained=None)
    model_cfg.backbone.type = "IVisionTransformer"
    model_cfg.decode_head.type = "ISegmenterMaskHead"
    model = MODELS.build(model_cfg)
    assert isinstance(model.backbone, IVisionTransformer) and model.backbone.embed_dims == 192

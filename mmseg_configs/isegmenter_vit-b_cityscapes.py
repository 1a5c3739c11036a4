# Integer-only I-Segmenter ViT-B/16 on Cityscapes 768x768. mmseg has no Cityscapes Segmenter, so
# this composes mmseg's Segmenter model with its Cityscapes 768 data, as the paper (rstrudel's
# settings: slide window 768, stride 512, 216 epochs ~ 80k iterations at batch 8).
# load_from: an FP32 Segmenter ViT-B trained on Cityscapes (none is published by mmseg).
_base_ = [
    'mmseg::_base_/models/segmenter_vit-b16_mask.py',
    'mmseg::_base_/datasets/cityscapes_768x768.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_80k.py',
    './_base_/isegmenter.py',
]
crop_size = (768, 768)
custom_imports = {{_base_.iseg_custom_imports}}
model = dict(
    type='ISegmenter',
    pretrained=None,
    quant={{_base_.iseg_quant}},
    data_preprocessor=dict(size=crop_size),
    backbone=dict(type='IVisionTransformer', img_size=crop_size, drop_path_rate=0.0),
    decode_head=dict(
        type='ISegmenterMaskHead', num_classes=19, drop_path_rate=0.0, l2_norm=False, upsample='nearest',
        upsample_factor=16),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(512, 512)),
)
optim_wrapper = {{_base_.iseg_optim_wrapper}}
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=1e-6, power=0.9, by_epoch=False, begin=1500, end=80000),
]
custom_hooks = [
    dict(type='CalibrationHook', num_samples=1, batch_size=8),
    dict(type='QATHook', momentum=0.01, freeze_iter=3720),  # 10 epochs of 2975 images at batch 8
    dict(type='PlainCheckpointHook'),
]
train_dataloader = dict(batch_size=1)  # x 8 GPUs, as mmseg's Segmenter configs
load_from = None

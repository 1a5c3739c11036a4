# Integer-only I-Segmenter ViT-S/16 on CamVid (11 classes, void = 11 ignored), 480x360 street scenes.
#   mim train mmseg mmseg_configs/isegmenter_vit-s_camvid.py --cfg-options data_root=/path/to/camvid
# Default data root: ../shared/data/camvid next to this repository (train/, trainannot/, val/, valannot/).
_base_ = [
    'mmseg::_base_/models/segmenter_vit-b16_mask.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_20k.py',
    './_base_/isegmenter.py',
]
data_root = '{{fileDirname}}/../../shared/data/camvid'
crop_size = (352, 480)
num_classes = 11
void = 11
custom_imports = {{_base_.iseg_custom_imports}}
model = dict(
    type='ISegmenter',
    pretrained=None,
    quant={{_base_.iseg_quant}},
    data_preprocessor=dict(size=crop_size, seg_pad_val=void, test_cfg=dict(size_divisor=16)),
    backbone=dict(type='IVisionTransformer', img_size=crop_size, embed_dims=384, num_heads=6, drop_path_rate=0.0),
    decode_head=dict(
        type='ISegmenterMaskHead', in_channels=384, channels=384, num_heads=6, embed_dims=384,
        num_classes=num_classes, ignore_index=void, drop_path_rate=0.0, l2_norm=False, upsample='nearest',
        upsample_factor=16),
    test_cfg=dict(mode='whole'),
)
metainfo = dict(
    classes=('sky', 'building', 'pole', 'road', 'pavement', 'tree', 'signsymbol', 'fence', 'car',
             'pedestrian', 'bicyclist'),
    palette=[[128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222], [128, 128, 0],
             [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0], [0, 128, 192]])
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=(480, 360), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75, ignore_index=void),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
dataset = dict(type='BaseSegDataset', data_root=data_root, metainfo=metainfo, img_suffix='.png',
               seg_map_suffix='.png', reduce_zero_label=False, ignore_index=void)
train_dataloader = dict(
    batch_size=8, num_workers=2, persistent_workers=True, sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(**dataset, data_prefix=dict(img_path='train', seg_map_path='trainannot'), pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=2, persistent_workers=True, sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(**dataset, data_prefix=dict(img_path='val', seg_map_path='valannot'), pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'], ignore_index=void)
test_evaluator = val_evaluator
optim_wrapper = {{_base_.iseg_optim_wrapper}}
custom_hooks = {{_base_.iseg_custom_hooks}}
load_from = None  # an FP32 Segmenter trained on CamVid (issue 4 trains one)

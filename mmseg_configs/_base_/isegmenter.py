# What I-Segmenter changes in a stock mmseg Segmenter config (I-Segmenter §3-§4.1). Only new
# names live here (mmengine refuses a key defined by two bases); each config picks them up with
# {{_base_.iseg_*}} so that it states only what differs from its mmseg:: base.
iseg_custom_imports = dict(imports=['iseg_plugin.mmseg'], allow_failed_imports=False)

# Integer-only model: the per-op lowering of the float Segmenter (INT8 weights and GEMM inputs, INT16
# residual stream and softmax input, I-LayerNorm), with I-Segmenter's operators: lambda-ShiftGELU and
# Shiftmax (gelu='poly' / softmax='bit-exp': IPTQ-ViT's); paper decoder (no L2 norm, nearest
# upsampling); no dropout or drop-path.
iseg_quant = dict(gelu='lambda-shift', softmax='shift')
iseg_model = dict(
    type='ISegmenter',
    pretrained=None,  # weights come from load_from (an FP32 Segmenter), not an ImageNet ViT
    quant=iseg_quant,
    backbone=dict(type='IVisionTransformer', drop_path_rate=0.0),
    decode_head=dict(
        type='ISegmenterMaskHead', drop_path_rate=0.0, l2_norm=False, upsample='nearest', upsample_factor=16),
)

# QAT (§4.1): SGD with polynomial decay after a linear warm-up; activation ranges follow an EMA
# (update 0.01) during the first 10 epochs and are then frozen. One-shot PTQ calibration runs
# first (1 image, EMA update 0.05); set num_samples=500 for the paper's S=500.
iseg_optim_wrapper = dict(
    type='OptimWrapper', optimizer=dict(type='SGD', lr=1e-4, momentum=0.9, weight_decay=0.0), clip_grad=None)
iseg_param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=1e-6, power=0.9, by_epoch=False, begin=1500, end=160000),
]
iseg_custom_hooks = [
    dict(type='CalibrationHook', num_samples=1, batch_size=8),
    dict(type='QATHook', momentum=0.01, freeze_iter=25000),
    dict(type='PlainCheckpointHook'),  # checkpoints that torch.load(weights_only=True) reads
]

# The CamVid Segmenter with I-Segmenter's own operators: lambda-ShiftGELU, Shiftmax, and its decoder
# (no L2 norm, nearest upsampling), from the FP32 decoder trained that way.
#   mim train mmseg mmseg_configs/isegmenter_vit-s_camvid_paper.py
_base_ = ['./isegmenter_vit-s_camvid.py']
model = dict(
    quant=dict(gelu='lambda-shift', softmax='shift'),
    decode_head=dict(l2_norm=False, upsample='nearest'),
    # QAT also trains the last 4 encoder blocks (6-9), where lambda-ShiftGELU errs most, at a tenth of the
    # decoder's learning rate: the decoder alone recovered 27 % of this model's PTQ loss at W8A8, with the
    # blocks 43 % (W4A8: 47 % -> 58 %; docs/qat_diagnostics.md, fourth and fifth rounds). It costs 20-25 s per
    # iteration instead of 9 (backward through 4 blocks; AVX-512 VNNI; 28-37 s on an AVX2-only CPU before the
    # kernels had an AVX2 GEMM), so 100 iterations instead of 200.
    backbone=dict(frozen_exclude=['layers.6.', 'layers.7.', 'layers.8.', 'layers.9.']),
    # The distillation weighs each labelled pixel by its class (the base config's distill_class_weight). W8A8:
    # 52.18 at 100 iterations in one run, against 50.12-51.45 for three runs without the weights
    # (docs/qat_diagnostics.md, seventh round).
    distill=dict(class_weight={{_base_.distill_class_weight}}),
)
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'backbone': dict(lr_mult=0.1)}))
train_cfg = dict(max_iters=100, val_interval=50)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=20),
    dict(type='PolyLR', eta_min=1e-6, power=0.9, by_epoch=False, begin=20, end=100),
]
default_hooks = dict(checkpoint=dict(interval=50))
load_from = '{{fileDirname}}/../checkpoints/camvid_dinov2s14_decoder_paper.pth'

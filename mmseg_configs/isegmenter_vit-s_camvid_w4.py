# The CamVid Segmenter with the best operators at W4A8: INT4 weights (GPTQ-rounded at the calibration; the trained
# decoder's start from GPTQ's integers), 8-bit activations. QAT trains the decoder on the distillation weighted by
# class (the base config's distill_class_weight) for 100 iterations: 51.36 (PTQ) -> 52.78 in one run, 51 % of the
# gap to FP32 54.16; the same weights over the base config's 200 iterations ended at 52.19 (52.60 at 100), the
# plain KL at 51.64 (docs/qat_diagnostics.md, eighth round).
#   mim train mmseg mmseg_configs/isegmenter_vit-s_camvid_w4.py
#   iseg deploy mmseg_configs/isegmenter_vit-s_camvid_w4.py work_dirs/isegmenter_vit-s_camvid_w4/iter_100.pth --out w4.iseg
_base_ = ['./isegmenter_vit-s_camvid.py']
model = dict(quant=dict(weight_bits=4), distill=dict(class_weight={{_base_.distill_class_weight}}))
train_cfg = dict(max_iters=100, val_interval=50)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=20),
    dict(type='PolyLR', eta_min=1e-6, power=0.9, by_epoch=False, begin=20, end=100),
]
default_hooks = dict(checkpoint=dict(interval=50))

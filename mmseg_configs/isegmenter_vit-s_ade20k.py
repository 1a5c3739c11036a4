# Integer-only I-Segmenter ViT-S/16 on ADE20K 512x512: QAT from the FP32 mmseg Segmenter.
#   mim train mmseg mmseg_configs/isegmenter_vit-s_ade20k.py
#   mim test mmseg mmseg_configs/isegmenter_vit-s_ade20k.py --checkpoint work_dirs/.../iter_160000.pth
_base_ = [
    'mmseg::segmenter/segmenter_vit-s_mask_8xb1-160k_ade20k-512x512.py',
    './_base_/isegmenter.py',
]
custom_imports = {{_base_.iseg_custom_imports}}
model = {{_base_.iseg_model}}
optim_wrapper = {{_base_.iseg_optim_wrapper}}
custom_hooks = {{_base_.iseg_custom_hooks}}
param_scheduler = {{_base_.iseg_param_scheduler}}
# FP32 Segmenter ViT-S/16 (mmseg model zoo)
load_from = 'https://download.openmmlab.com/mmsegmentation/v0.5/segmenter/segmenter_vit-s_mask_8x1_512x512_160k_ade20k/segmenter_vit-s_mask_8x1_512x512_160k_ade20k_20220105_151706-511bb103.pth'  # noqa

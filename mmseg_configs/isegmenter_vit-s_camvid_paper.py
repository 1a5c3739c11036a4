# The CamVid Segmenter with I-Segmenter's own operators: lambda-ShiftGELU, Shiftmax, and its decoder
# (no L2 norm, nearest upsampling), from the FP32 decoder trained that way. QAT as in the base config:
#   mim train mmseg mmseg_configs/isegmenter_vit-s_camvid_paper.py
_base_ = ['./isegmenter_vit-s_camvid.py']
model = dict(
    quant=dict(gelu='lambda-shift', softmax='shift'),
    decode_head=dict(l2_norm=False, upsample='nearest'),
)
load_from = '{{fileDirname}}/../checkpoints/camvid_dinov2s14_decoder_paper.pth'

# Integer-only I-Segmenter ViT-T/16 on Cityscapes 768x768 (ViT-B config with the ViT-T sizes).
_base_ = ['./isegmenter_vit-b_cityscapes.py']
model = dict(
    backbone=dict(embed_dims=192, num_layers=12, num_heads=3),
    decode_head=dict(in_channels=192, channels=192, num_heads=3, embed_dims=192),
)

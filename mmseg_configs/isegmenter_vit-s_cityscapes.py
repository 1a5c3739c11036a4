# Integer-only I-Segmenter ViT-S/16 on Cityscapes 768x768 (ViT-B config with the ViT-S sizes).
_base_ = ['./isegmenter_vit-b_cityscapes.py']
model = dict(
    backbone=dict(embed_dims=384, num_layers=12, num_heads=6),
    decode_head=dict(in_channels=384, channels=384, num_heads=6, embed_dims=384),
)

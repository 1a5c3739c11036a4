# Integer-only I-Segmenter ViT-L/16 on Cityscapes 768x768 (ViT-B config with the ViT-L sizes).
_base_ = ['./isegmenter_vit-b_cityscapes.py']
model = dict(
    backbone=dict(embed_dims=1024, num_layers=24, num_heads=16),
    decode_head=dict(in_channels=1024, channels=1024, num_heads=16, embed_dims=1024),
)

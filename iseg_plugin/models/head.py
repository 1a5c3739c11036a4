"""Float Mask Transformer decoder, a drop-in for mmseg's ``SegmenterMaskTransformerHead``.

Same arguments and parameter names as mmseg's head (its checkpoints load as they are, through the
key-mapping hook for the transformer layers), plus the two decoder options I-Segmenter changes:

* ``l2_norm``: L2-normalise patch and class features before ``masks = P C^T`` (Segmenter: on;
  I-Segmenter: off);
* ``upsample``: how the 1/p masks reach the input resolution, ``'bilinear'`` (Segmenter, done by
  mmseg after the head) or ``'nearest'`` (I-Segmenter). The head upsamples by ``upsample_factor``
  (the encoder's patch size) itself, so that the choice is part of the model; mmseg's own resize
  to the same size is then the identity.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from mmengine.model import ModuleList
from mmengine.model.weight_init import trunc_normal_
from mmseg.models.decode_heads.decode_head import BaseDecodeHead
from torch import Tensor, nn

from .checkpoint import register_head_checkpoint_hook
from .vit import TransformerBlock, check_gelu, layer_norm_eps

UPSAMPLE_MODES = ("bilinear", "nearest")


class ISegmenterMaskHead(BaseDecodeHead):
    """Segmenter's Mask Transformer decoder with explicit modules (FX-traceable)."""

    def __init__(self, in_channels, num_layers, num_heads, embed_dims, mlp_ratio=4, drop_path_rate=0.1,
                 drop_rate=0.0, attn_drop_rate=0.0, num_fcs=2, qkv_bias=True, act_cfg=dict(type="GELU"),
                 norm_cfg=dict(type="LN"), init_std=0.02, l2_norm=True, upsample="bilinear", upsample_factor=16,
                 **kwargs):
        super().__init__(in_channels=in_channels, **kwargs)
        if num_fcs != 2:
            raise NotImplementedError(f"only num_fcs=2 is supported, got {num_fcs}")
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
        check_gelu(act_cfg)
        eps = layer_norm_eps(norm_cfg)
        dpr = torch.linspace(0, drop_path_rate, num_layers).tolist()
        self.layers = ModuleList(
            TransformerBlock(embed_dims, num_heads, mlp_ratio * embed_dims, drop_rate, attn_drop_rate, dpr[i],
                             qkv_bias, eps)
            for i in range(num_layers)
        )
        self.dec_proj = nn.Linear(in_channels, embed_dims)
        self.cls_emb = nn.Parameter(torch.randn(1, self.num_classes, embed_dims))
        self.patch_proj = nn.Linear(embed_dims, embed_dims, bias=False)
        self.classes_proj = nn.Linear(embed_dims, embed_dims, bias=False)
        self.decoder_norm = nn.LayerNorm(embed_dims, eps=eps)
        self.mask_norm = nn.LayerNorm(self.num_classes, eps=eps)
        self.init_std = init_std
        self.l2_norm = l2_norm
        self.upsample = upsample
        self.upsample_factor = upsample_factor
        delattr(self, "conv_seg")
        register_head_checkpoint_hook(self)

    def init_weights(self):
        trunc_normal_(self.cls_emb, std=self.init_std)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=self.init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def resize_masks(self, masks: Tensor) -> Tensor:
        size = (masks.shape[-2] * self.upsample_factor, masks.shape[-1] * self.upsample_factor)
        if self.upsample == "nearest":
            return F.interpolate(masks, size=size, mode="nearest")
        return F.interpolate(masks, size=size, mode="bilinear", align_corners=self.align_corners)

    def forward(self, inputs) -> Tensor:
        x = self._transform_inputs(inputs)
        grid_h, grid_w = x.shape[-2], x.shape[-1]
        x = self.dec_proj(x.flatten(2).transpose(1, 2))
        x = torch.cat((x, self.cls_emb.expand(x.shape[0], -1, -1)), dim=1)
        for layer in self.layers:
            x = layer(x)
        x = self.decoder_norm(x)
        patches = self.patch_proj(x[:, : -self.num_classes])
        classes = self.classes_proj(x[:, -self.num_classes:])
        if self.l2_norm:
            patches = F.normalize(patches, dim=2, p=2)
            classes = F.normalize(classes, dim=2, p=2)
        masks = self.mask_norm(torch.matmul(patches, classes.transpose(1, 2)))
        return self.resize_masks(masks.transpose(1, 2).unflatten(2, (grid_h, grid_w)))


class PooledLinearHead(nn.Module):
    """Classifier head on an encoder's feature maps: global max pooling, then a Linear.

    Takes the encoder's tuple of (B, C, h, w) maps (uses the last) and returns (B, num_classes)
    logits. Max pooling (not mean) keeps the integer form exact: the max of quantized features is
    the quantized max, so pooling needs no rounding.
    """

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, inputs: tuple[Tensor, ...]) -> Tensor:
        return self.fc(inputs[-1].amax(dim=(-2, -1)))

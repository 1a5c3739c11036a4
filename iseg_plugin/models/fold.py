"""Structural reparameterization for PTQ: fold LayerNorm's affine into the Linear layers after it.

``W (gamma * n + beta) + b = (W diag(gamma)) n + (W beta + b)``: exact in real arithmetic. After the
fold, each LayerNorm outputs the plain normalised ``n`` (unit variance in every channel), which a
per-tensor INT8 quantizer covers evenly, while the per-channel spread of gamma (DINOv2's spans
orders of magnitude) moves into the weights, whose INT8 quantization is per output channel.
``mask_norm`` (followed by no Linear) and ``decoder_norm`` (followed by bias-free projections, which
cannot take beta) keep their affine.
"""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def fold_norm_into_linears(norm: nn.Module, linears: list[nn.Module]) -> None:
    """Fold ``norm``'s weight and bias into every Linear in ``linears``, then make it the identity affine."""
    gamma, beta = norm.weight.detach().clone(), norm.bias.detach().clone()
    for linear in linears:
        shift = linear.weight @ beta
        linear.weight.mul_(gamma)
        if linear.bias is not None:
            linear.bias.add_(shift)
        elif shift.abs().max() > 0:
            raise ValueError(f"cannot fold a LayerNorm bias into {type(linear).__name__} without a bias")
    norm.weight.fill_(1.0)
    norm.bias.zero_()


@torch.no_grad()
def fold_layernorms(model: nn.Module) -> int:
    """Fold every LayerNorm of an ISegmenter (float or quantized) that feeds Linear layers only."""
    enc, head = model.backbone, model.decode_head
    pairs = []
    for blocks in (enc.layers, head.layers):
        for block in blocks:
            pairs += [(block.norm1, [block.attn.qkv]), (block.norm2, [block.mlp.fc1])]
    pairs += [(enc.norm, [head.dec_proj])]
    for norm, linears in pairs:
        fold_norm_into_linears(norm, linears)
    return len(pairs)

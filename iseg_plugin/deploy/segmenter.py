"""The deployed integer-only Segmenter: uint8 pixels in, integer logits and a class map out."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import intops
from ..intops import Dyadic
from ..quant.act import pixels_to_int8
from .modules import INT8, INT16, INT64, IntAdd, IntBlock, IntLayerNorm, IntLinear, Requant, int8_matmul


def patch_grid(patch_size: int, input_size: tuple[int, int]) -> tuple[int, int]:
    """The patch grid of an (H, W) input padded up to a multiple of the patch."""
    return -(-input_size[0] // patch_size), -(-input_size[1] // patch_size)


def check_pixels(images: Tensor, input_size: tuple[int, int]) -> None:
    """A deployed model's input must be uint8 RGB pixels (B, 3, H, W) of the size it was built for."""
    if images.dtype != torch.uint8:
        raise TypeError(
            f"the deployed model takes uint8 RGB pixels (B, 3, H, W), got {images.dtype}: pass the image "
            "before any normalisation (mean and std are folded into the model)"
        )
    if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != tuple(input_size):
        raise ValueError(
            f"the deployed model was built for (B, 3, {input_size[0]}, {input_size[1]}) images, got "
            f"{tuple(images.shape)}: resize or pad the image, or convert the model for this size"
        )


class DeployedEncoder(nn.Module):
    def __init__(self, patch_size: int, mean_fixed: Tensor, pad_pixel: Tensor, pixel_scale: Dyadic, patch: IntLinear,
                 tokens: Requant,
                 cls_token: Tensor, pos_embed: Tensor, pos_add: IntAdd, blocks: list[IntBlock], norm: IntLayerNorm):
        super().__init__()
        self.patch_size = patch_size
        self.register_buffer("mean_fixed", mean_fixed.to(INT64))
        self.register_buffer("pad_pixel", pad_pixel.to(INT64))
        self.pixel_scale = Requant(pixel_scale, 8)
        self.patch, self.tokens = patch, tokens
        self.register_buffer("cls_token", cls_token.to(INT16))
        self.register_buffer("pos_embed", pos_embed.to(INT16))
        self.pos_add = pos_add
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm

    def pad(self, pixels: Tensor) -> Tensor:
        """Pad to a multiple of the patch with the mean pixel (0 after normalisation, as mmseg pads)."""
        p = self.patch_size
        b, c, h, w = pixels.shape
        padded = self.pad_pixel.view(1, c, 1, 1).expand(b, c, h + (-h) % p, w + (-w) % p).clone()
        padded[..., :h, :w] = pixels
        return padded

    def forward(self, pixels: Tensor) -> Tensor:
        """uint8 (B, 3, H, W) -> INT8 features (B, h*w, C) (cls token dropped)."""
        x = pixels_to_int8(self.pad(pixels.to(INT64)), self.mean_fixed, self.pixel_scale.dyadic()).to(INT8)
        p = self.patch_size
        b, c, h, w = x.shape
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), -1)
        tokens = self.tokens(self.patch(patches)).to(INT16)
        x = torch.cat((self.cls_token.expand(b, -1, -1), tokens), dim=1)
        x = self.pos_add(x, self.pos_embed).to(INT16)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1:].to(INT8)


class DeployedDecoder(nn.Module):
    def __init__(self, num_classes: int, dec_proj: IntLinear, tokens: Requant, cls_emb: Tensor, blocks: list[IntBlock],
                 decoder_norm: IntLayerNorm, patch_proj: IntLinear, patch_act: Requant, classes_proj: IntLinear,
                 classes_act: Requant, l2_acts: tuple[Requant, Requant] | None, masks_act: Requant,
                 mask_norm: IntLayerNorm, upsample: str, upsample_factor: int):
        super().__init__()
        self.num_classes = num_classes
        self.dec_proj, self.tokens = dec_proj, tokens
        self.register_buffer("cls_emb", cls_emb.to(INT16))
        self.blocks = nn.ModuleList(blocks)
        self.decoder_norm = decoder_norm
        self.patch_proj, self.patch_act, self.classes_proj, self.classes_act = patch_proj, patch_act, classes_proj, classes_act
        self.l2_acts = None if l2_acts is None else nn.ModuleList(l2_acts)
        self.masks_act, self.mask_norm = masks_act, mask_norm
        self.upsample, self.upsample_factor = upsample, upsample_factor

    def forward(self, feats: Tensor, grid: tuple[int, int]) -> Tensor:
        """INT8 features (B, N, C) -> INT16 logits (B, K, H, W)."""
        k = self.num_classes
        x = self.tokens(self.dec_proj(feats)).to(INT16)
        x = torch.cat((x, self.cls_emb.expand(x.shape[0], -1, -1)), dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.decoder_norm(x).to(INT8)
        patches = self.patch_act(self.patch_proj(x[:, :-k]))
        classes = self.classes_act(self.classes_proj(x[:, -k:]))
        if self.l2_acts is not None:
            patches = self.l2_acts[0](intops.l2_normalize(patches))
            classes = self.l2_acts[1](intops.l2_normalize(classes))
        masks = self.masks_act(int8_matmul(patches.to(INT8), classes.to(INT8).transpose(1, 2)))
        masks = self.mask_norm(masks).transpose(1, 2).unflatten(2, grid)
        size = (grid[0] * self.upsample_factor, grid[1] * self.upsample_factor)
        up = intops.upsample_nearest if self.upsample == "nearest" else intops.upsample_bilinear
        return up(masks, size).to(INT16)


class DeployedSegmenter(nn.Module):
    """Integer-only Segmenter for one input size: ``forward(uint8 (B, 3, H, W) RGB)`` returns
    ``(logits, classes)``: INT16 logits (B, K, H', W') at the padded size (H, W rounded up to the
    patch) and the int64 class map (B, H, W)."""

    def __init__(self, encoder: DeployedEncoder, decoder: DeployedDecoder, input_size: tuple[int, int],
                 arch: dict):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.input_size = tuple(input_size)
        self.arch = arch  # what rebuilds the module tree from a state dict (see .io)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        check_pixels(images, self.input_size)
        grid = patch_grid(self.encoder.patch_size, self.input_size)
        logits = self.decoder(self.encoder(images), grid)
        classes = logits[..., : self.input_size[0], : self.input_size[1]].argmax(1)
        return logits, classes

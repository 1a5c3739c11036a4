"""The image input: uint8 RGB pixels -> the INT8 integers of the normalised image, integers only.

The float model sees ``x = (p - mean) / std``. Its INT8 quantization at scale S is computed from the
pixels as ``requantize(256 p - round(256 mean), 1 / (256 std S))`` per channel: the normalisation is
folded into one dyadic multiplier per channel, so a model that receives uint8 pixels computes the
same integers as one that quantizes the normalised float image (up to the mean's 8 fraction bits).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .dyadic import Dyadic, dyadic_from_ratio, requantize

MEAN_FRAC_BITS = 8


def pixel_params(mean, std, scale) -> tuple[Tensor, Dyadic]:
    """Integer constants of a normalisation ``(p - mean) / std`` and an INT8 input scale: the mean with
    8 fraction bits, and one multiplier ``1 / (256 std S)`` per channel (conversion time)."""
    unit = 1 << MEAN_FRAC_BITS
    mean = torch.as_tensor(mean, dtype=torch.float64).flatten()
    std = torch.as_tensor(std, dtype=torch.float64).flatten()
    mean_fixed = torch.round(mean * unit).to(torch.int64)
    return mean_fixed, dyadic_from_ratio(1.0 / (unit * std * torch.as_tensor(scale, dtype=torch.float64)))


def pixels_to_int8(pixels: Tensor, mean_fixed: Tensor, multiplier: Dyadic) -> Tensor:
    """(B, 3, H, W) pixels (uint8, or floats holding 0..255) -> INT8 input integers."""
    if pixels.dtype.is_floating_point:
        mean_fixed = mean_fixed.to(pixels.dtype)
    else:
        pixels = pixels.to(torch.int64)
    shifted = pixels.permute(0, 2, 3, 1) * (1 << MEAN_FRAC_BITS) - mean_fixed  # channels last
    return requantize(shifted, multiplier, 8).permute(0, 3, 1, 2)

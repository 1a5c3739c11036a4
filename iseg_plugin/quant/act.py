"""Activation quantizers: EMA range observers that requantize integers into INT8/INT16.

``QTensor`` carries the integers and their scale explicitly: Brevitas' ``IntQuantTensor`` is lost
by ``torch.matmul`` and softmax (ecosystem notes §1.1), and the integer operators need the scale
as a ratio to turn into a dyadic multiplier. The observers follow I-ViT's ``QuantAct`` with the
paper's update weight (alpha = 0.05 for PTQ, 0.01 for QAT): per-tensor min/max EMA, symmetric
scale, ranges synchronised across processes under distributed training.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import intops


class QTensor(NamedTuple):
    """Integers (int tensor, or float tensor holding integers in QAT) and their real scale."""

    value: Tensor
    scale: Tensor  # scalar, or one per channel of the last dimension

    def dequantize(self) -> Tensor:
        return self.value * self.scale.to(self.value.dtype)


class NotCalibratedError(RuntimeError):
    """A quantizer was used before it saw any data."""


def _all_reduce(t: Tensor, op) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=op)
    return t


class QuantAct(nn.Module):
    """Requantize integers (or quantize a float tensor) to a per-tensor ``bits``-wide scale.

    While ``observing`` the range is updated from each batch (EMA with ``momentum`` = the
    paper's alpha; the first batch is taken as it is). The range, the observing flag and the
    calibrated flag are buffers, so they travel with checkpoints. ``asymmetric`` puts the
    ``2**bits`` levels on [min, max] instead of [-absmax, absmax] (see :mod:`iseg_plugin.intops.quantize`).
    """

    def __init__(self, bits: int = 8, momentum: float = 0.05, asymmetric: bool = False):
        super().__init__()
        self.bits = bits
        self.momentum = momentum
        self.asymmetric = asymmetric
        self.register_buffer("min_val", torch.zeros(()))
        self.register_buffer("max_val", torch.zeros(()))
        self.register_buffer("calibrated", torch.tensor(False))
        self.register_buffer("observing", torch.tensor(True))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, momentum={self.momentum}" + (", asymmetric" if self.asymmetric else "")

    @torch.no_grad()
    def observe(self, real: Tensor) -> None:
        if not bool(self.observing):
            return
        cur_min = _all_reduce(real.detach().amin().float(), dist.ReduceOp.MIN)
        cur_max = _all_reduce(real.detach().amax().float(), dist.ReduceOp.MAX)
        running = (self.min_val, self.max_val) if bool(self.calibrated) else None
        new_min, new_max = intops.ema_minmax(running, torch.stack([cur_min, cur_max]), self.momentum)
        self.min_val.copy_(new_min)
        self.max_val.copy_(new_max)
        self.calibrated.fill_(True)

    def scale(self) -> Tensor:
        if not bool(self.calibrated):
            raise NotCalibratedError(
                f"{type(self).__name__}({self.extra_repr()}) has no range yet: calibrate the model "
                "(iseg ptq, or CalibrationHook in the config) or train it before evaluating"
            )
        if self.asymmetric:
            return intops.asymmetric_scale(self.min_val, self.max_val, self.bits)
        return intops.symmetric_scale(self.min_val, self.max_val, self.bits)

    def bounds(self) -> int | tuple[int, int]:
        """What the integers are clamped to: the signed width, or the asymmetric grid's (lo, hi)."""
        if self.asymmetric:
            return intops.asymmetric_bounds(self.min_val, self.scale(), self.bits)
        return self.bits

    def requant_params(self, in_scale: Tensor) -> intops.Dyadic:
        """The dyadic multiplier from ``in_scale`` to this quantizer's scale (also used at conversion)."""
        return intops.dyadic_from_ratio(in_scale.double() / self.scale().double())

    def forward(self, x: QTensor | Tensor) -> QTensor:
        if isinstance(x, QTensor):
            self.observe(x.dequantize())
            return QTensor(intops.requantize(x.value, self.requant_params(x.scale), self.bounds()), self.scale())
        self.observe(x)
        return QTensor(intops.quantize(x, self.scale(), self.bounds()), self.scale())


class QuantInput(QuantAct):
    """INT8 image input computed from uint8 pixels with integers only.

    The float model sees ``x = (p - mean) / std``. Here ``x`` is quantized as
    ``requantize(256 p - round(256 mean), 1 / (256 std S))`` per channel: the normalisation is
    folded into one dyadic multiplier per channel, so the deployed model, which receives the uint8
    pixels, computes the very same integers. Pixels are recovered from ``x`` exactly (rounding).
    """

    MEAN_FRAC_BITS = 8

    def __init__(self, momentum: float = 0.05):
        super().__init__(8, momentum)
        self.register_buffer("mean", torch.zeros(3))
        self.register_buffer("std", torch.ones(3))

    def set_normalization(self, mean: Tensor, std: Tensor) -> None:
        self.mean.copy_(mean.flatten())
        self.std.copy_(std.flatten())

    def pixel_params(self) -> tuple[Tensor, intops.Dyadic]:
        """Integer constants: the mean with 8 fraction bits, and per-channel multipliers."""
        return pixel_params(self.mean, self.std, self.scale())

    def forward(self, x: Tensor) -> QTensor:
        self.observe(x)
        pixels = torch.round(x.detach() * self.std[:, None, None] + self.mean[:, None, None])
        return QTensor(pixels_to_int8(pixels, *self.pixel_params()), self.scale())


def pixel_params(mean, std, scale) -> tuple[Tensor, intops.Dyadic]:
    """:class:`QuantInput`'s integer constants for a normalisation ``(p - mean) / std`` and an INT8 input
    scale: the mean with 8 fraction bits, and one multiplier ``1 / (256 std S)`` per channel."""
    unit = 1 << QuantInput.MEAN_FRAC_BITS
    mean = torch.as_tensor(mean, dtype=torch.float64).flatten()
    std = torch.as_tensor(std, dtype=torch.float64).flatten()
    mean_fixed = torch.round(mean * unit).to(torch.int64)
    return mean_fixed, intops.dyadic_from_ratio(1.0 / (unit * std * torch.as_tensor(scale, dtype=torch.float64)))


def pixels_to_int8(pixels: Tensor, mean_fixed: Tensor, multiplier: intops.Dyadic) -> Tensor:
    """(B, 3, H, W) pixels (uint8, or floats holding 0..255) -> INT8 input integers (QuantInput's rule)."""
    if pixels.dtype.is_floating_point:
        mean_fixed = mean_fixed.to(pixels.dtype)
    else:
        pixels = pixels.to(torch.int64)
    shifted = pixels.permute(0, 2, 3, 1) * (1 << QuantInput.MEAN_FRAC_BITS) - mean_fixed  # channels last
    return intops.requantize(shifted, multiplier, 8).permute(0, 3, 1, 2)


class QuantAdd(QuantAct):
    """Residual add: both operands requantized to one ``bits``-wide scale (I-ViT's residual QuantAct)."""

    def __init__(self, bits: int = 16, momentum: float = 0.05):
        super().__init__(bits, momentum)

    def forward(self, a: QTensor, b: QTensor) -> QTensor:
        self.observe(a.dequantize() + b.dequantize())
        out = intops.requantize_add(
            a.value, self.requant_params(a.scale), b.value, self.requant_params(b.scale), self.bits
        )
        return QTensor(out, self.scale())


class QuantCat(QuantAct):
    """Concatenate quantized tokens with a float embedding (cls token, class embeddings) at one scale."""

    def __init__(self, bits: int = 16, momentum: float = 0.05, embedding_first: bool = True):
        super().__init__(bits, momentum)
        self.embedding_first = embedding_first

    def forward(self, tokens: QTensor, embedding: Tensor) -> QTensor:
        self.observe(torch.cat([tokens.dequantize().flatten(), embedding.detach().flatten().to(tokens.value.dtype)]))
        scale = self.scale()
        parts = [
            intops.requantize(tokens.value, self.requant_params(tokens.scale), self.bits),
            intops.quantize(embedding, scale, self.bits).to(tokens.value.dtype),
        ]
        if self.embedding_first:
            parts.reverse()
        return QTensor(torch.cat(parts, dim=1), scale)


def observers(model: nn.Module) -> list[QuantAct]:
    return [m for m in model.modules() if isinstance(m, QuantAct)]


def set_observing(model: nn.Module, observing: bool, momentum: float | None = None) -> int:
    """Switch every range observer of ``model`` on or off (and set its EMA weight); returns their count."""
    found = observers(model)
    for m in found:
        m.observing.fill_(observing)
        if momentum is not None:
            m.momentum = momentum
    for m in model.modules():
        if hasattr(m, "set_calibrating"):
            m.set_calibrating(observing)
    return len(found)

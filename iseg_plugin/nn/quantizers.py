"""Brevitas activation quantizers with the plugin's range rule.

Brevitas' stock activation quantizers learn a scale initialised from a percentile; the FX / torch.ao
front end observes the min and max (:class:`~iseg_plugin.ops.observer.IsegObserver`) and maps
``max(|min|, |max|)`` to ``2**(b-1) - 1``. ``IsegActPerTensor`` is a Brevitas quantizer whose scale is
that rule (the same observer inside it), so a model quantized through Brevitas (:mod:`.swap`) and the
same model through ``prepare_fx`` get the same scales from the same calibration, hence the same integers.
It observes whenever Brevitas runs it in training mode (``calibration_mode`` and QAT) and holds its
range in eval; the range is part of the state dict. A model output's quantizer (``iseg_output``) covers every
value calibration saw, with headroom, as the FX lowering's output grid (:meth:`IsegObserver.covering_scale`).
"""
from __future__ import annotations

import torch
from brevitas.quant import Int8ActPerTensorFloat
from torch import Tensor, nn

from ..ops.observer import IsegObserver


class IsegActScaling(nn.Module):
    """Brevitas ``scaling_impl``: the plugin observer's symmetric scale for ``bit_width`` (not a threshold
    divided by Brevitas' integer threshold: the plugin's grid maps the range to 2**(b-1) - 1 and clamps to
    the full signed range, which no Brevitas int-scaling gives)."""

    def __init__(self, bit_width: int, iseg_momentum: float | None, iseg_output: bool = False):
        super().__init__()
        self.bits = int(bit_width)
        self.observer = IsegObserver(momentum=iseg_momentum)
        self.output = bool(iseg_output)

    def forward(self, x: Tensor, int_threshold: Tensor | None = None) -> Tensor:
        if self.training:
            self.observer(x)
        if not self.observer.calibrated():  # Brevitas' own probe before any data: a neutral scale
            return torch.ones((), dtype=x.dtype, device=x.device)
        scale = self.observer.covering_scale(self.bits) if self.output else self.observer.scale(self.bits)
        return torch.tensor(scale, dtype=x.dtype, device=x.device)


class IsegActPerTensor(Int8ActPerTensorFloat):
    """Signed per-tensor activation quantizer with the plugin's range rule (``bit_width`` 8 or 16)."""

    scaling_impl = IsegActScaling
    iseg_momentum = None
    iseg_output = False


def iseg_act_quant(bits: int, momentum: float | None = None, output: bool = False):
    """The plugin's activation quantizer at ``bits`` (8 or 16) with its observer's range rule ``momentum`` (None:
    every value seen; a number: an EMA weight); ``output``: the
    model's output (a grid covering every value calibration saw)."""
    if bits not in (8, 16):
        raise ValueError(f"activation widths are 8 or 16 bits, got {bits}")
    return IsegActPerTensor.let(bit_width=bits, iseg_momentum=momentum, iseg_output=output)

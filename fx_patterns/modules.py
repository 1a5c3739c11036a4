"""The modules torch.ao swaps in: float pattern -> observed module (prepare) -> integer module (convert).

* Observed modules are the Brevitas front end's quantized modules (``IQuantVisionTransformer``,
  ``IQuantSegmenterMaskHead``) built from the float module with ``from_float``: the same quant
  layers, range observers and ``intops`` calls. They observe while the prepared model runs on
  calibration images (or trains, with ``prepare_qat_fx``).
* Integer modules are built by ``iseg_plugin.deploy.convert``'s own helpers from the observed
  module: the deployed encoder / decoder, so the FX path and the Brevitas/MMSeg path give the
  same integers for the same weights and calibration images.

Between two pattern modules the activations travel as the plugin's ``QTensor`` (prepared model)
or plain int8 tensors (converted model), not as torch.ao quantized tensors: those have no INT16
(the residual stream). Each module observes its activation ranges inside itself; the observers
torch.ao inserts at its boundaries pass tensors through and leave no op behind (see :mod:`.qconfig`).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from iseg_plugin.deploy.convert import (
    Scales,
    deploy_decoder,
    deploy_encoder,
    freeze_calibrated,
    int_linear_from,
)
from iseg_plugin.deploy.segmenter import check_pixels, patch_grid
from iseg_plugin.models import ISegmenterMaskHead, IVisionTransformer, PooledLinearHead
from iseg_plugin.models.quant import IQuantSegmenterMaskHead, IQuantVisionTransformer
from iseg_plugin.quant import QTensor, QuantAct, QuantLinear, set_observing

from .qconfig import IsegActivationObserver


def _options(module: nn.Module) -> IsegActivationObserver:
    """The plugin's options, carried by the qconfig's activation entry (see :mod:`.qconfig`)."""
    qconfig = getattr(module, "qconfig", None)
    options = None if qconfig is None else qconfig.activation()
    if not isinstance(options, IsegActivationObserver):
        raise TypeError(
            f"{type(module).__name__} needs the plugin's qconfig (fx_patterns.get_iseg_qconfig), got {qconfig}"
        )
    return options


def _observe_from(observed: nn.Module, float_module: nn.Module, options: IsegActivationObserver) -> nn.Module:
    observed.qconfig = float_module.qconfig  # torch.ao's convert reads it from the observed module
    set_observing(observed, True, options.momentum)  # ranges (and Poly-GELU's samples) from the next forwards
    observed.train(float_module.training)
    return observed


class _InputQuantizer(nn.Module):
    """The INT8 quantizer of a head used without a plugin encoder before it (float features in).

    Unused (and dropped at conversion) when the head follows an observed encoder, whose QTensor
    features come in with their own scale. Records the input's shape and scale: the integer
    module is built from them.
    """

    def __init__(self):
        super().__init__()
        self.act = QuantAct(8)
        self.register_buffer("scale", torch.zeros(()))
        self.register_buffer("shape", torch.zeros(4, dtype=torch.int64))
        self.register_buffer("quantizes", torch.tensor(False))

    def forward(self, x) -> QTensor:
        q = x if isinstance(x, QTensor) else self.act(x)
        self.quantizes.fill_(not isinstance(x, QTensor))
        self.scale.copy_(q.scale.detach().reshape(()))
        self.shape.copy_(torch.tensor(q.value.shape))
        return q

    def example(self) -> QTensor:
        """A zero input of the recorded shape and scale (the probe that reads every scale at conversion)."""
        if not bool(self.shape.any()):
            raise RuntimeError("the observed head has seen no input: run the prepared model on calibration images")
        return QTensor(torch.zeros(self.shape.tolist()), self.scale.clone())

    def freeze_and_probe(self, head: nn.Module, in_index: int = -1) -> tuple[Scales, float]:
        """Drop this quantizer if unused, freeze ``head``'s ranges and record the scale every quant
        layer sees in one probe forward; returns them and the input scale."""
        if not bool(self.quantizes):
            del self.act
        freeze_calibrated(head)
        example = self.example()
        probe = [example] * (in_index + 1 if in_index >= 0 else -in_index)
        return Scales(head, lambda: head.forward_quant(probe)), float(example.scale)


class ObservedEncoder(IQuantVisionTransformer):
    """Observed ``IVisionTransformer``: the quantized encoder; records its input size for conversion."""

    @classmethod
    def from_float(cls, encoder: IVisionTransformer, quant: dict | None = None) -> "ObservedEncoder":
        options = _options(encoder)
        if encoder.out_indices != [len(encoder.layers) - 1]:
            raise ValueError(f"the integer encoder outputs its last block only; got out_indices={encoder.out_indices}")
        observed = super().from_float(encoder, options.quant)
        observed.input_quant.set_normalization(torch.tensor(options.mean), torch.tensor(options.std))
        observed.register_buffer("input_hw", torch.zeros(2, dtype=torch.int64))
        return _observe_from(observed, encoder, options)

    def forward(self, inputs: Tensor) -> tuple[QTensor, ...]:
        self.input_hw.copy_(torch.tensor(inputs.shape[-2:]))
        return super().forward(inputs)


class ObservedMaskHead(IQuantSegmenterMaskHead):
    """Observed ``ISegmenterMaskHead``: the quantized decoder; returns float logits like the float head."""

    @classmethod
    def from_float(cls, head: ISegmenterMaskHead, quant: dict | None = None) -> "ObservedMaskHead":
        options = _options(head)
        if head.input_transform is not None:
            raise ValueError(f"the integer decoder takes one feature map; got input_transform={head.input_transform!r}")
        observed = super().from_float(head, options.quant)
        observed.input_quantizer = _InputQuantizer()
        return _observe_from(observed, head, options)

    def _transform_inputs(self, inputs):
        return self.input_quantizer(inputs[self.in_index])


class ObservedPooledHead(PooledLinearHead):
    """Observed ``PooledLinearHead``: max pooling on the integers, INT8 weights, INT32 logits."""

    @classmethod
    def from_float(cls, head: PooledLinearHead) -> "ObservedPooledHead":
        options = _options(head)
        observed = cls.__new__(cls)
        nn.Module.__init__(observed)
        observed.fc = QuantLinear.from_float(head.fc)
        observed.input_quantizer = _InputQuantizer()
        return _observe_from(observed, head, options)

    def forward_quant(self, inputs) -> QTensor:
        x = self.input_quantizer(inputs[-1])
        return self.fc(QTensor(x.value.amax(dim=(-2, -1)), x.scale))

    def forward(self, inputs) -> Tensor:
        return self.forward_quant(inputs).dequantize().float()


class IntEncoder(nn.Module):
    """Integer-only encoder: uint8 RGB pixels (B, 3, H, W) -> ``(int8 features (B, C, h, w),)``.

    The float encoder took normalised images; mean and std (from the qconfig) are folded into its
    first requantization, so it takes the pixels themselves, at the calibration images' size.
    """

    def __init__(self, encoder, input_size: tuple[int, int]):
        super().__init__()
        self.encoder = encoder
        self.input_size = tuple(input_size)

    @classmethod
    def from_observed(cls, observed: ObservedEncoder) -> "IntEncoder":
        freeze_calibrated(observed)
        input_size = tuple(observed.input_hw.tolist())
        grid = patch_grid(observed.patch_size, input_size)
        probe = torch.zeros(1, 3, grid[0] * observed.patch_size, grid[1] * observed.patch_size)
        scales = Scales(observed, lambda: observed(probe))
        return cls(deploy_encoder(observed, scales, grid), input_size)

    def forward(self, pixels: Tensor) -> tuple[Tensor]:
        check_pixels(pixels, self.input_size)
        grid = patch_grid(self.encoder.patch_size, self.input_size)
        return (self.encoder(pixels).transpose(1, 2).unflatten(2, grid),)


class IntMaskHead(nn.Module):
    """Integer-only Mask Transformer: ``(int8 features (B, C, h, w), ...)`` -> INT16 logits (B, K, H, W).

    After an ``IntEncoder`` the features are its output. Used alone, the head takes features
    quantized to INT8 at ``input_scale`` (a number for the caller; the forward never reads it).
    """

    def __init__(self, decoder, in_index: int, input_scale: float):
        super().__init__()
        self.decoder = decoder
        self.in_index = in_index
        self.input_scale = input_scale

    @classmethod
    def from_observed(cls, observed: ObservedMaskHead) -> "IntMaskHead":
        scales, input_scale = observed.input_quantizer.freeze_and_probe(observed, observed.in_index)
        return cls(deploy_decoder(observed, scales), observed.in_index, input_scale)

    def forward(self, inputs) -> Tensor:
        x = inputs[self.in_index]
        return self.decoder(x.flatten(2).transpose(1, 2), tuple(x.shape[-2:]))


class IntPooledLinearHead(nn.Module):
    """Integer-only classifier head: int8 features (B, C, h, w) -> INT32 logits (as int64), max pooled."""

    def __init__(self, fc, input_scale: float):
        super().__init__()
        self.fc = fc
        self.input_scale = input_scale

    @classmethod
    def from_observed(cls, observed: ObservedPooledHead) -> "IntPooledLinearHead":
        scales, input_scale = observed.input_quantizer.freeze_and_probe(observed)
        return cls(int_linear_from(observed.fc, scales(observed.fc)), input_scale)

    def forward(self, inputs) -> Tensor:
        return self.fc(inputs[-1].amax(dim=(-2, -1)))

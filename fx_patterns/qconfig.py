"""The plugin's qconfig: what torch.ao is told about the integer Segmenter's pattern modules.

A ``QConfig`` is a pair of observer factories. For the plugin's patterns:

* ``weight``: torch.ao's ``PerChannelMinMaxObserver`` declaring INT8 per-output-channel symmetric
  weights on the narrow range [-127, 127], the weights the integer modules hold (they are computed
  by Brevitas' ``Int8WeightPerChannelFloat``, shared with the Brevitas front end, so both front
  ends hold the same integers).
* ``activation``: :class:`IsegActivationObserver`. It carries the plugin's options (GELU and
  softmax variants, bit widths, EMA weight, input normalisation) to ``from_float``. The ranges
  themselves are observed inside the pattern modules: they need INT16 (residual stream, attention
  logits) and asymmetric grids that torch.ao's quantized tensors lack. Its dtype is ``quint8``:
  the converted graph's input is uint8 pixels and its output integer logits, both declared
  already quantized to torch.ao (``input_quantized_indexes`` / ``output_quantized_indexes`` in the
  custom configs), so convert inserts no float quantize / dequantize op anywhere; the observers
  torch.ao puts between pattern modules pass their input through and are removed at convert.
"""
from __future__ import annotations

import torch
from torch.ao.quantization import PerChannelMinMaxObserver, QConfig
from torch.ao.quantization.observer import ObserverBase

from iseg_plugin.models.quant import QuantConfig

# mmseg's Segmenter configs normalise with mean = std = 127.5 (ImageNet's for DINOv2 / CamVid).
SEGMENTER_MEAN = (127.5, 127.5, 127.5)
SEGMENTER_STD = (127.5, 127.5, 127.5)


class IsegActivationObserver(ObserverBase):
    """Activation entry of the plugin's qconfig: options for the pattern modules, identity forward.

    ``quant`` takes :class:`iseg_plugin.models.quant.QuantConfig`'s fields (``gelu``, ``lam``,
    ``softmax``, ``softmax_bits``, ``scores_bits``, ``gelu_out_asymmetric``); ``momentum`` is the
    EMA update of the range observers (0.05 for PTQ, 0.01 for QAT as in the paper); ``mean`` /
    ``std`` are the float model's input normalisation, folded into the integer encoder.
    """

    def __init__(self, momentum: float = 0.05, mean=SEGMENTER_MEAN, std=SEGMENTER_STD, **quant):
        super().__init__(dtype=torch.quint8)
        QuantConfig(**quant)  # validates the options now, with QuantConfig's own error messages
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std are three per-channel values (std > 0), got mean={mean}, std={std}")
        self.quant = dict(quant)
        self.momentum = momentum
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)

    def forward(self, x):
        return x  # ranges are observed inside the pattern modules

    def calculate_qparams(self):
        raise RuntimeError(
            "the plugin's pattern modules quantize their own activations; torch.ao has no qparams to "
            "compute for them (convert with fx_patterns' convert custom config)"
        )

    def extra_repr(self) -> str:
        return f"quant={self.quant}, momentum={self.momentum}"


def get_iseg_qconfig(momentum: float = 0.05, mean=SEGMENTER_MEAN, std=SEGMENTER_STD, **quant) -> QConfig:
    """The qconfig of the plugin's pattern modules (options: see :class:`IsegActivationObserver`)."""
    IsegActivationObserver(momentum, mean, std, **quant)  # fail here, not inside torch.ao's prepare
    weight = PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                                quant_min=-127, quant_max=127)
    return QConfig(activation=IsegActivationObserver.with_args(momentum=momentum, mean=mean, std=std, **quant),
                   weight=weight)


def is_iseg_qconfig(qconfig) -> bool:
    return qconfig is not None and isinstance(qconfig.activation(), IsegActivationObserver)

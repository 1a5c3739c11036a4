"""Quant layers (Brevitas weight quantizers + intops arithmetic) and range observers."""
from .act import NotCalibratedError, QTensor, QuantAct, QuantAdd, QuantCat, QuantInput, observers, set_observing
from .layers import QuantConv2d, QuantGELU, QuantLayerNorm, QuantLinear, QuantSoftmax

__all__ = [
    "NotCalibratedError",
    "QTensor",
    "QuantAct",
    "QuantAdd",
    "QuantCat",
    "QuantInput",
    "observers",
    "set_observing",
    "QuantConv2d",
    "QuantGELU",
    "QuantLayerNorm",
    "QuantLinear",
    "QuantSoftmax",
]

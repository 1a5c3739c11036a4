"""Brevitas layers of the plugin's integer operators: ``IntQuantTensor`` in, ``IntQuantTensor`` out.

They compose with Brevitas' own ``QuantLinear`` / ``QuantConv2d`` (INT8 weights, ``Int32Bias``,
``return_quant_tensor=True``) and ``QuantIdentity``, so a Brevitas user can build an integer-only ViT
block by hand (``examples/brevitas_vit_block.py``).
"""
from .layers import (
    DyadicRequant,
    Int16ActPerTensorFloat,
    QuantCat,
    QuantGELU,
    QuantILayerNorm,
    QuantL2Norm,
    QuantMatMul,
    QuantMean,
    QuantMul,
    QuantRegistryOp,
    QuantRequantizedOp,
    QuantResidualAdd,
    QuantScalarMul,
    QuantSoftmax,
    QuantUpsample,
)
from .quantizers import iseg_act_quant
from .swap import quantize

__all__ = ["DyadicRequant", "Int16ActPerTensorFloat", "QuantCat", "QuantGELU", "QuantILayerNorm", "QuantL2Norm",
           "QuantMatMul", "QuantMean", "QuantMul", "QuantRegistryOp", "QuantRequantizedOp", "QuantResidualAdd", "QuantScalarMul", "QuantSoftmax", "QuantUpsample",
           "iseg_act_quant", "quantize"]

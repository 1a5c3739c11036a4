"""Integer arithmetic of the integer-only Segmenter: every algorithm once, as pure functions.

Each function takes tensors holding integers and returns integers. Integer tensors (any width)
are the deployed path and give int64; float tensors holding integers are the QAT path and give
the same integers as floats, with a straight-through gradient (see :mod:`._bridge`). Docstrings
state each operator's input range, output range and scale, rounding rule and intermediate widths.

Float appears only in the ``*_params`` / ``exp_i0`` / ``dyadic_from_ratio`` / ``fit_*`` helpers,
which run once at conversion to turn real scales into integer constants.
"""
from .dyadic import Dyadic, dyadic_from_ratio, requantize, requantize_add
from .exp import bit_exp_params, bit_exp_softmax, exp_i0, shift_exp, shiftmax
from .gelu import (
    K_INTER_GELU,
    LAMBDA_DEFAULT,
    LambdaGeluParams,
    PolyGeluParams,
    fit_poly_gelu,
    lambda_shift_gelu,
    lambda_shift_gelu_params,
    poly_gelu,
    poly_gelu_params,
    shift_gelu,
)
from .norm import LayerNormParams, i_layernorm, isqrt, l2_normalize, layernorm_eps, layernorm_params
from .quantize import (
    asymmetric_bounds,
    asymmetric_scale,
    channel_minmax,
    ema_minmax,
    int_range,
    pack_int4,
    quantize,
    quantize_constant,
    round_ste,
    symmetric_scale,
    unpack_int4,
    weight_scale,
)
from .pixels import pixel_params, pixels_to_int8
from .resize import bilinear_table, upsample_bilinear, upsample_nearest
from .clamp import clamp_bounds, int_clamp, relu, relu6
from .conv import conv2d, conv2d_acc, conv_padding, conv_transpose2d_acc, requantize_channels
from .pool import (
    AvgPoolParams,
    adaptive_avg_pool_params,
    adaptive_max_pool_params,
    avg_pool,
    avg_pool_params,
    max_pool,
    max_pool_params,
)
from .sigmoid import (
    QUICK_GELU_ALPHA,
    HardParams,
    SigmoidParams,
    hard_params,
    hardsigmoid,
    hardswish,
    quick_gelu,
    sigmoid,
    sigmoid_params,
    silu,
    x_sigmoid,
)

__all__ = [
    "Dyadic",
    "dyadic_from_ratio",
    "requantize",
    "requantize_add",
    "exp_i0",
    "shift_exp",
    "shiftmax",
    "bit_exp_params",
    "bit_exp_softmax",
    "LAMBDA_DEFAULT",
    "K_INTER_GELU",
    "shift_gelu",
    "lambda_shift_gelu",
    "LambdaGeluParams",
    "lambda_shift_gelu_params",
    "PolyGeluParams",
    "fit_poly_gelu",
    "poly_gelu_params",
    "poly_gelu",
    "isqrt",
    "LayerNormParams",
    "layernorm_params",
    "layernorm_eps",
    "i_layernorm",
    "l2_normalize",
    "int_range",
    "symmetric_scale",
    "channel_minmax",
    "ema_minmax",
    "quantize",
    "quantize_constant",
    "asymmetric_scale",
    "asymmetric_bounds",
    "round_ste",
    "weight_scale",
    "pack_int4",
    "unpack_int4",
    "pixel_params",
    "pixels_to_int8",
    "bilinear_table",
    "upsample_nearest",
    "upsample_bilinear",
    "clamp_bounds",
    "conv2d",
    "conv2d_acc",
    "conv_padding",
    "conv_transpose2d_acc",
    "requantize_channels",
    "int_clamp",
    "relu",
    "relu6",
    "AvgPoolParams",
    "avg_pool_params",
    "adaptive_avg_pool_params",
    "avg_pool",
    "max_pool_params",
    "adaptive_max_pool_params",
    "max_pool",
    "QUICK_GELU_ALPHA",
    "SigmoidParams",
    "sigmoid_params",
    "sigmoid",
    "x_sigmoid",
    "quick_gelu",
    "silu",
    "HardParams",
    "hard_params",
    "hardsigmoid",
    "hardswish",
]

"""The registry's entries: every integer operator, its float ops, its constants, its deployed module.

Each ``_lower_*`` function is a variant's conversion step: it reads the observed scales of the op's
inputs and output (a :class:`~iseg_plugin.lowering.lower.Site`), computes the integer constants once
and emits the deployed module of :mod:`.modules`. Adding an operator or a variant is one ``register``
call here.
"""
from __future__ import annotations

import math
import operator
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .. import intops
from . import modules as M
from .registry import REGISTRY, OpEntry, Variant
from .site import Const, Operand, OpSite as Site

aten = torch.ops.aten
WEIGHT_BITS = (8, 4)  # the GEMM weight widths a site may choose (INT8, or INT4 for W4A8)
SOFTMAX_BITS = 16  # probabilities in [0, 2**15], read by the next GEMM as two int8 halves
L2_FRAC_BITS = 15  # the integer L2 norm's output: unit vectors at scale 2**-15


# a frozen tensor's integers, valid while the same tensors are unchanged (torch's in-place version counter):
# QAT lowers the model again for each batch, and a frozen encoder's weights are the same each time. An entry
# goes when one of its tensors is freed (a weight computed anew each step is then not kept).
_FROZEN: dict[tuple, tuple] = {}


def quantize_weight(weight: torch.Tensor, bits: int, input_energy: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric ``bits``-wide integers (round half to even, as Brevitas and torch.ao),
    as a float tensor holding them (straight-through gradient to ``weight``), and the scales. The scales
    are computed in float64, as Brevitas' ``Int8WeightPerChannelFloat`` computes them in a float64
    model: the Brevitas swap (:mod:`iseg_plugin.nn.swap`) then gets the same integers. INT4 scales come
    from a per-channel clip search, its error weighted by ``input_energy`` (:func:`intops.weight_scale`)."""
    if weight.requires_grad:
        return _quantize_weight(weight, bits, input_energy)
    sources = (weight,) if input_energy is None else (weight, input_energy)
    key = (bits,) + tuple(id(t) for t in sources)
    hit = _FROZEN.get(key)
    if hit is None or not all(r() is t and v == t._version for (r, v), t in zip(hit[0], sources)):
        state = tuple((weakref.ref(t, lambda _: _FROZEN.pop(key, None)), t._version) for t in sources)
        hit = _FROZEN[key] = state, _quantize_weight(weight, bits, input_energy)
    return hit[1]


def _quantize_weight(weight: torch.Tensor, bits: int, input_energy: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    w = weight.double().flatten(1)
    scale = intops.weight_scale(w, bits, None if input_energy is None else input_energy.double())
    return intops.quantize(w, scale, bits, channel_dim=0).float(), scale


def input_energy(observer, weight: torch.Tensor) -> torch.Tensor | None:
    """The mean square of each input channel of a Linear, as its input's observer saw it (None where there
    is none, or for a convolution's patches, whose columns are not the input's last dimension)."""
    energy = getattr(observer, "channel_energy", None)
    return energy if energy is not None and weight.dim() == 2 and energy.numel() == weight.shape[1] else None


def _linear_module(site: Site, x: Operand, weight, bias, offset: int = 0) -> tuple[M.Linear, float, tuple[int, int]]:
    """W x + b as ``W (x - offset) + (b + offset * sum(W))``: ``offset`` brings a 256-level input such as
    an asymmetric GELU output into int8, and the bias takes it back (exact). The weight width is the site's
    choice (its output observer's ``weight_bits``: 8, or 4 for W4A8)."""
    bits = site.observer.weight_bits
    calibrated, fixed = site.observer.weight_int, site.observer.weight_scale  # GPTQ's (iseg_plugin.gptq), if any
    if calibrated.numel():
        if site.lowering.trainable and weight.requires_grad:
            raise site.refuse("its weights hold PTQ-calibrated (GPTQ) integers, which QAT cannot train: "
                              "freeze them, or prepare the model again without them")
        w_int, w_scale = calibrated.float(), fixed
    elif fixed.numel():  # a weight trained from GPTQ's integers keeps GPTQ's scales
        w_int, w_scale = intops.quantize(weight.double().flatten(1), fixed, bits, channel_dim=0).float(), fixed
    else:
        w_int, w_scale = quantize_weight(weight, bits, input_energy(x.observer, weight))
    acc_scale = x.scale * w_scale
    b = torch.zeros(w_int.shape[0], dtype=torch.float64) if bias is None else intops.round_ste(bias.double() / acc_scale)
    b = b + offset * w_int.double().sum(1)
    b_int = None if bias is None and offset == 0 else site.lowering.integers(b.clamp(-(2**31), 2**31 - 1), torch.int32)
    out, scale, bounds = site.requant_to_output(acc_scale)
    return M.Linear(site.lowering.integers(w_int, torch.int8), b_int, out, offset, bits), scale, bounds


def _int8_offset(x) -> int:
    """The shift that brings a 256-level operand (asymmetric grid) into int8; 0 for other operands."""
    if isinstance(x, Operand) and x.bounds[1] - x.bounds[0] == 255 and x.bounds != (-128, 127):
        return x.bounds[0] + 128
    return 0


def _lower_linear(site: Site) -> Operand:
    offset = _int8_offset(site.args[0])
    x = site.args[0] if offset else site.input(0)
    if site.module is not None:
        weight, bias = site.module.weight, site.module.bias
    else:
        weight, bias = site.arg(1, "weight"), site.arg(2, "bias")
    module, scale, bounds = _linear_module(site, x, weight, bias, offset)
    return site.out(site.emit(module, x.node), scale, bounds)


def _pair(value) -> tuple[int, int]:
    """A Conv2d size argument (int, or a sequence of one or two) as (h, w)."""
    return tuple(value) * (2 // len(value)) if isinstance(value, (list, tuple)) else (value, value)


def _conv_args(site: Site):
    if site.module is not None:
        c = site.module
        return c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups
    return (site.arg(1, "weight"), site.arg(2, "bias"), site.arg(3, "stride", 1), site.arg(4, "padding", 0),
            site.arg(5, "dilation", 1), site.arg(6, "groups", 1))


def _lower_patch_conv(site: Site) -> Operand:
    weight, bias, stride, padding, dilation, groups = _conv_args(site)
    kernel = tuple(weight.shape[-2:])
    if _pair(stride) != kernel or _pair(padding) != (0, 0) or groups != 1 or _pair(dilation) != (1, 1):
        raise site.refuse("only patchifying Conv2d (kernel == stride, no padding, groups 1) has an integer "
                          f"lowering; got kernel {kernel}, stride {stride}, padding {padding}")
    _, _, h, w = site.lowering.shape(site.node.args[0])
    if h % kernel[0] or w % kernel[1]:
        raise site.refuse(f"input {h}x{w} is not a multiple of the patch {kernel}: pad it first")
    x = site.input(0)
    module, scale, bounds = _linear_module(site, x, weight, bias)  # patches flatten as (in, kh, kw)
    return site.out(site.emit(M.PatchConv(module, kernel), x.node), scale, bounds)


def _lower_matmul(site: Site) -> Operand:
    a = site.args[0]
    probabilities = isinstance(a, Operand) and a.bounds == (0, 1 << (SOFTMAX_BITS - 1))
    a = a if probabilities else site.input(0, 8)
    b = site.input(1, 8)
    out, scale, bounds = site.requant_to_output(a.scale * b.scale)
    return site.out(site.emit(M.MatMul(probabilities, out), a.node, b.node), scale, bounds)


def _lower_add(site: Site) -> Operand:
    if site.node.kwargs.get("alpha", 1) != 1:
        raise site.refuse("add with alpha != 1 has no integer lowering")
    scale, bounds = site.output_format()
    bits = 16 if bounds[1] > 127 else 8
    parts = [site.args[0], site.args[1]]
    if not all(isinstance(p, (Operand, Const)) for p in parts):
        raise site.refuse("adding a Python number to a quantized tensor has no integer lowering")
    a, b = (p if isinstance(p, Operand) else site.lowering.quantized_constant(p, 16, f"{site.name}_const")
            for p in parts)
    module = M.Add(intops.dyadic_from_ratio(a.scale / scale), intops.dyadic_from_ratio(b.scale / scale), bits)
    return site.out(site.emit(module, a.node, b.node), scale, bounds)


def _lower_mul(site: Site, divide: bool = False) -> Operand:
    a, b = site.args[0], site.args[1]
    if not isinstance(a, Operand):
        a, b = b, a
    if not isinstance(b, Operand):  # a constant: a Python number or a tensor that does not depend on the input
        c = torch.as_tensor(b.value if isinstance(b, Const) else b).detach().double()
        if divide:
            c = 1.0 / c
        if c.numel() == 1 and float(c) > 0:  # a positive scalar only changes the scale: no op at all
            return Operand(a.node, a.scale * float(c), a.bounds, site.observer)
        if c.numel() == 1 or (c.dim() >= 1 and c.numel() == c.shape[-1]):  # per channel of the last dim
            out, scale, bounds = site.requant_to_output(a.scale * c.flatten())
            return site.out(site.emit(out, a.node), scale, bounds)
        raise site.refuse("multiplying by a constant that is not a scalar or per-channel has no integer lowering")
    if divide:
        raise site.refuse("dividing by a quantized tensor has no integer lowering")
    a, b = site.input(0), site.input(1)
    out, scale, bounds = site.requant_to_output(a.scale * b.scale)
    return site.out(site.emit(M.Mul(out), a.node, b.node), scale, bounds)


def _layer_norm_args(site: Site):
    if site.module is not None:
        m = site.module
        return m.normalized_shape, m.weight, m.bias, m.eps
    return site.arg(1, "normalized_shape"), site.arg(2, "weight"), site.arg(3, "bias"), site.arg(4, "eps", 1e-5)


def _lower_layer_norm(site: Site) -> Operand:
    shape, weight, bias, eps = _layer_norm_args(site)
    channels = site.lowering.shape(site.node.args[0])[-1]
    if tuple(shape) != (channels,):
        raise site.refuse(f"I-LayerNorm normalises the last dimension only; got normalized_shape {tuple(shape)}")
    weight = torch.ones(channels) if weight is None else weight
    bias = torch.zeros(channels) if bias is None else bias
    x = site.input(0)
    params = intops.layernorm_params(weight.float(), bias.float())
    params = params._replace(weight=site.lowering.integers(params.weight, torch.int64),
                             bias=site.lowering.integers(params.bias, torch.int64))
    out, scale, bounds = site.requant_to_output(params.out_scale)
    module = M.LayerNorm(params, intops.layernorm_eps(eps, x.scale), out)
    return site.out(site.emit(module, x.node), scale, bounds)


GELU_OUT_SHIFT = 7  # the GELUs' output is at S * 2**-7 before its requantization


class NoSamplesError(ValueError):
    """An operator fitted to calibration samples of its input saw none."""


def gelu_module(build, in_scale: float, out_scale: float, bounds: tuple[int, int], samples) -> nn.Module:
    """The deployed GELU that a variant's ``build`` makes for an input scale and an output grid (the GELUs
    compute at ``S_in * 2**-7``, then requantize to the grid)."""
    return build(in_scale, M.Requant.between(in_scale * 2.0**-GELU_OUT_SHIFT, out_scale, bounds), samples)


def _gelu_lowering(build):
    def lower(site: Site) -> Operand:
        x = site.input(0)
        # INT8 on an asymmetric grid where only GEMMs read it (unless the observer asks for a symmetric one)
        asymmetric = not getattr(site.observer, "symmetric", False)
        scale, bounds = site.asymmetric_output_format() if asymmetric else site.output_format()
        try:
            module = gelu_module(build, x.scale, scale, bounds, None if x.observer is None else x.observer.samples)
        except NoSamplesError as err:
            raise site.refuse(str(err)) from None
        return site.out(site.emit(module, x.node), scale, bounds)

    return lower


def _poly_gelu(scale: float, out: M.Requant, samples) -> M.PolyGELU:
    if samples is None or samples.numel() == 0:
        raise NoSamplesError("Poly-GELU is fitted to calibration samples of its input, and none were observed")
    a, b = intops.fit_poly_gelu(samples)
    return M.PolyGELU(intops.poly_gelu_params(a, b, scale), out)


def _lambda_shift_gelu(scale: float, out: M.Requant, samples=None) -> M.LambdaShiftGELU:
    return M.LambdaShiftGELU(intops.lambda_shift_gelu_params(scale), out)


def _shift_gelu(scale: float, out: M.Requant, samples=None) -> M.ShiftGELU:
    return M.ShiftGELU(intops.exp_i0(scale), out)


def _bit_exp_softmax(scale: float, bits: int, dim: int) -> M.BitExpSoftmax:
    return M.BitExpSoftmax(intops.bit_exp_params(scale), bits, dim)


def _shiftmax(scale: float, bits: int, dim: int) -> M.Shiftmax:
    return M.Shiftmax(intops.exp_i0(scale), bits, dim)


def _softmax_dim(site: Site) -> int:
    dim = site.module.dim if site.module is not None else site.arg(1, "dim")
    if dim is None:
        raise site.refuse("softmax needs an explicit dim")
    return dim


def _softmax_lowering(build):
    def lower(site: Site) -> Operand:
        x = site.input(0)
        module = build(x.scale, SOFTMAX_BITS, _softmax_dim(site))
        return site.out(site.emit(module, x.node), 2.0 ** -(SOFTMAX_BITS - 1), (0, 1 << (SOFTMAX_BITS - 1)))

    return lower


def _lower_normalize(site: Site) -> Operand:
    p, dim = site.arg(1, "p", 2.0), site.arg(2, "dim", 1)
    rank = len(site.lowering.shape(site.node.args[0]))
    if p != 2 or dim not in (-1, rank - 1):
        raise site.refuse(f"integer L2 normalisation is over the last dimension with p=2; got p={p}, dim={dim}")
    x = site.input(0)
    out, scale, bounds = site.requant_to_output(2.0**-L2_FRAC_BITS)
    return site.out(site.emit(M.L2Norm(L2_FRAC_BITS, out), x.node), scale, bounds)


def _interpolate_mode(site: Site) -> tuple[str, bool | None]:
    if site.module is not None:
        return site.module.mode, site.module.align_corners
    if site.node.target == aten.upsample_nearest2d.vec:
        return "nearest", None
    if site.node.target == aten.upsample_bilinear2d.vec:
        return "bilinear", site.arg(2, "align_corners")
    return site.arg(3, "mode", "nearest"), site.arg(4, "align_corners", None)


def _lower_interpolate(site: Site) -> Operand:
    mode, align = _interpolate_mode(site)
    if mode not in ("nearest", "bilinear") or (mode == "bilinear" and align):
        raise site.refuse(f"integer upsampling is nearest or bilinear (align_corners=False); got mode={mode!r}, "
                          f"align_corners={align}")
    x = site.input(0, 16)
    size = site.shape()[-2:]
    return site.out(site.emit(M.Upsample(mode, size, None), x.node), x.scale, x.bounds)


def reduced_count(shape, dim) -> int:
    """How many elements a reduction over ``dim`` (one or several) of a ``shape`` tensor sums per output."""
    return math.prod(shape[d] for d in (dim if isinstance(dim, (list, tuple)) else (dim,)))


def _lower_mean(site: Site) -> Operand:
    dim, keepdim = site.arg(1, "dim"), bool(site.arg(2, "keepdim", False))
    if dim is None:
        raise site.refuse("mean over all dimensions: give dim")
    count = reduced_count(site.lowering.shape(site.node.args[0]), dim)
    x = site.input(0)
    out, scale, bounds = site.requant_to_output(x.scale / count)
    return site.out(site.emit(M.Mean(dim, keepdim, out), x.node), scale, bounds)


def cat_requant(part_scale: float, part_bounds: tuple[int, int], scale: float,
                bounds: tuple[int, int]) -> M.Requant | None:
    """How a part enters a concatenation at ``scale`` / ``bounds``: as it is (None) if it is already there."""
    if part_scale == scale and bounds[0] <= part_bounds[0] and part_bounds[1] <= bounds[1]:
        return None
    return M.Requant.between(part_scale, scale, bounds)


def _lower_cat(site: Site) -> Operand:
    parts = site.args[0] if site.args else site.kwargs["tensors"]  # Operands and Consts, not unwrapped
    dim = site.arg(1, "dim", 0)
    scale, bounds = site.output_format()
    bits = 16 if bounds[1] > 127 else 8
    nodes, requants = [], []
    for i, part in enumerate(parts):
        if isinstance(part, Const):
            part = site.lowering.quantized_constant(part, bits, f"{site.name}_const{i}", scale=scale)
        requants.append(cat_requant(part.scale, part.bounds, scale, bounds))
        nodes.append(part.node)
    module = M.Cat(dim, requants, M.storage_dtype(bounds))
    return site.out(site.emit(module, *nodes), scale, bounds)


def _lower_shape_op(site: Site) -> Operand | Const:
    """Shape ops move integers without changing them: the same call on the integer tensor."""
    source = next(a for a in site.args + list(site.kwargs.values()) if isinstance(a, Operand))
    node = site.node
    if node.op == "call_module":  # Dropout / Identity in eval: nothing
        return source
    if node.target in (F.pad, aten.pad.default, aten.constant_pad_nd.default):
        constant = node.target is aten.constant_pad_nd.default
        mode, value = ("constant", site.arg(2, "value", 0)) if constant else (site.arg(2, "mode", "constant"),
                                                                               site.arg(3, "value", 0))
        if mode != "constant" or value not in (0, 0.0, None):
            raise site.refuse(f"only zero padding has an integer lowering; got mode={mode!r}, value={value}")
    if node.target in _IDENTITY_METHODS + _IDENTITY_ATEN:
        if node.kwargs.get("memory_format") != torch.contiguous_format:
            return source
        # a copy made contiguous (x.clone(memory_format=torch.contiguous_format)): a view after it needs that layout
        new = site.lowering.shape_op("call_function", aten.contiguous.default, (source.node,), {})
        return Operand(new, source.scale, source.bounds, source.observer)
    args = site.map_to_new(tuple(site.args))
    kwargs = {k: site.map_to_new(v) for k, v in site.kwargs.items()}
    new = site.lowering.shape_op(node.op, node.target, args, kwargs)
    return Operand(new, source.scale, source.bounds, source.observer)


def _single(lower, doc: str) -> dict[str, Variant]:
    return {"default": Variant("default", lower, doc)}


_IDENTITY_METHODS = ("float", "to", "type_as", "clone", "detach")
# (dtype casts too: the float model casts float32 to float32, the integer model must keep its integers)
_IDENTITY_ATEN = (aten.clone.default, aten.alias.default, aten.detach.default, aten.to.dtype, aten._to_copy.default,
                  aten.dropout.default)
# ``contiguous`` is no identity: it is called on the integers, because a ``view`` after it needs its layout
# (nn.MultiheadAttention: ``...transpose(...).contiguous().view(...)``)
# Permutations and repetitions (Swin's shifted windows roll, DPT's readout expand_as) move integers too.
SHAPE_METHODS = ("reshape", "view", "permute", "transpose", "t", "flatten", "unflatten", "expand", "squeeze",
                 "unsqueeze", "contiguous", "roll", "flip", "repeat", "expand_as") + _IDENTITY_METHODS
SHAPE_ATEN = (aten.view.default, aten.reshape.default, aten.permute.default, aten.transpose.int, aten.t.default,
              aten.flatten.using_ints, aten.unflatten.int, aten.expand.default, aten.squeeze.dim, aten.squeeze.dims,
              aten.unsqueeze.default, aten.slice.Tensor, aten.select.int, aten.pad.default,
              aten.constant_pad_nd.default, aten.contiguous.default, aten.roll.default, aten.flip.default,
              aten.repeat.default, aten.expand_as.default)

REGISTRY.register(OpEntry(
    "linear", "INT8 x INT8 -> INT32 (+ INT32 bias), per-channel dyadic requantization to the output",
    modules=(nn.Linear,), functions=(F.linear,), aten=(aten.linear.default,), input_bits=8,
    variants=_single(_lower_linear, "int8 GEMM, requantization fused in the module")))
REGISTRY.register(OpEntry(
    "conv2d", "patchifying Conv2d (kernel == stride) as one INT8 GEMM over patches",
    modules=(nn.Conv2d,), aten=(aten.conv2d.default,), input_bits=8,
    variants=_single(_lower_patch_conv, "patches @ W^T")))
REGISTRY.register(OpEntry(
    "matmul", "activation @ activation: INT8 x INT8, or UINT16 probabilities x INT8 (two int8 halves)",
    functions=(torch.matmul, operator.matmul, torch.bmm), methods=("matmul", "bmm"),
    aten=(aten.matmul.default, aten.bmm.default), input_bits=8,
    variants=_single(_lower_matmul, "int32 accumulator, requantized")))
REGISTRY.register(OpEntry(
    "add", "residual / embedding add: both operands requantized to the output scale (INT16 stream)",
    functions=(operator.add, torch.add, operator.iadd), methods=("add",), aten=(aten.add.Tensor,), input_bits=None,
    variants=_single(_lower_add, "requantize_add")))
REGISTRY.register(OpEntry(
    "mul", "x * c (scalar: a scale change, no op; per channel: one requantization) or x * y, and x / c",
    functions=(operator.mul, torch.mul), methods=("mul",), aten=(aten.mul.Tensor,), input_bits=None,
    variants=_single(_lower_mul, "dyadic rescale")))
REGISTRY.register(OpEntry(
    "div", "x / c for a constant c: a scale change",
    functions=(operator.truediv, torch.div), methods=("div",), aten=(aten.div.Tensor,), input_bits=None,
    variants=_single(lambda site: _lower_mul(site, divide=True), "dyadic rescale")))
REGISTRY.register(OpEntry(
    "layer_norm", "I-LayerNorm over the last dimension, fused with its output requantization",
    modules=(nn.LayerNorm,), functions=(F.layer_norm,), aten=(aten.layer_norm.default,), input_bits=16,
    variants=_single(_lower_layer_norm, "exact isqrt, INT16 gamma, int64 sums")))
REGISTRY.register(OpEntry(
    "gelu", "integer GELU of INT8 input, output S * 2**-7 requantized",
    modules=(nn.GELU,), functions=(F.gelu,), aten=(aten.gelu.default,), input_bits=8,
    variants={
        "poly": Variant("poly", _gelu_lowering(_poly_gelu), "Poly-GELU (IPTQ-ViT): quartic erf fitted on calibration data",
                        _poly_gelu),
        "lambda-shift": Variant("lambda-shift", _gelu_lowering(_lambda_shift_gelu),
                                "lambda-ShiftGELU (I-Segmenter): sigmoid reference capped at lambda = 6", _lambda_shift_gelu),
        "shift": Variant("shift", _gelu_lowering(_shift_gelu), "ShiftGELU (I-ViT): x * sigmoid(1.6875 x) by ShiftExp",
                         _shift_gelu),
    }))
REGISTRY.register(OpEntry(
    "softmax", "integer softmax of INT16 logits; probabilities UINT16-range [0, 2**15], scale 2**-15",
    modules=(nn.Softmax,), functions=(F.softmax, torch.softmax), methods=("softmax",),
    aten=(aten.softmax.int, aten._softmax.default), input_bits=16,
    variants={
        "bit-exp": Variant("bit-exp", _softmax_lowering(_bit_exp_softmax),
                           "bit-exp softmax (IPTQ-ViT, our reading): exact log2 e, quadratic 2**u", _bit_exp_softmax),
        "shift": Variant("shift", _softmax_lowering(_shiftmax), "Shiftmax (I-ViT)", _shiftmax),
    }))
REGISTRY.register(OpEntry(
    "l2_normalize", "integer L2 normalisation over the last dimension (F.normalize, p=2)",
    functions=(F.normalize,), input_bits=16, variants=_single(_lower_normalize, "exact isqrt, 15 fraction bits")))
REGISTRY.register(OpEntry(
    "interpolate", "nearest, or integer bilinear with exact rational weights (align_corners=False)",
    modules=(nn.Upsample,), functions=(F.interpolate,),
    aten=(aten.upsample_nearest2d.vec, aten.upsample_bilinear2d.vec), input_bits=16,
    variants=_single(_lower_interpolate, "same scale as the input")))
REGISTRY.register(OpEntry(
    "mean", "mean over dims: int64 sum, one requantization by S_in / (n S_out)",
    functions=(torch.mean,), methods=("mean",), aten=(aten.mean.dim,), input_bits=16, variants=_single(_lower_mean, "sum + requant")))
REGISTRY.register(OpEntry(
    "cat", "concatenation at the output scale (constants such as cls tokens quantized to it)",
    functions=(torch.cat, torch.concat), aten=(aten.cat.default,), input_bits=None, variants=_single(_lower_cat, "requantize, then cat")))
REGISTRY.register(OpEntry(
    "shape", "reshape / permute / index / roll / flip / repeat / pad(0) / dropout in eval: the same call on the integers",
    modules=(nn.Dropout, nn.Identity), functions=(operator.getitem, torch.flatten, torch.transpose, torch.permute,
                                                   torch.reshape, torch.squeeze, torch.unsqueeze, torch.roll,
                                                   torch.flip, F.pad, F.dropout),
    methods=SHAPE_METHODS, aten=SHAPE_ATEN + _IDENTITY_ATEN, observation="share", input_bits=None, variants=_single(_lower_shape_op, "no arithmetic")))
REGISTRY.register(OpEntry(
    "split", "chunk / split / unbind: tuples of integer tensors (not observed: torch.ao observes tensors only)",
    functions=(torch.chunk, torch.split, torch.unbind), methods=("chunk", "split", "unbind"),
    aten=(aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int), observation="none",
    input_bits=None, variants=_single(_lower_shape_op, "no arithmetic")))

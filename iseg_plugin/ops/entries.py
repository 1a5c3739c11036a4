"""The registry's entries: every integer operator, its float ops, its constants, its deployed module.

Per entry: ``*_attributes(call)`` reads the op's attributes (from the lowering's site or the Brevitas swap's
node), ``*_check(attributes)`` says why they have no integer form, ``_build_*(attributes, input grids, output
grid)`` computes the integer constants once and returns the deployed module of :mod:`.modules` (every front end
calls it), and a ``_lower_*`` function places it in the lowered graph where :func:`lower_built` does not fit.
Adding an operator is one ``register`` call here and its deployed module (docs/architecture.md).
"""
from __future__ import annotations

import math
import operator
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .. import intops
from . import modules as M
from .grid import PROBABILITIES, SOFTMAX_BITS, Grid
from .registry import REGISTRY, OpEntry, Variant
from .site import Const, Operand, OpSite as Site

aten = torch.ops.aten
WEIGHT_BITS = (8, 4)  # the GEMM weight widths a site may choose (INT8, or INT4 for W4A8)
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


def _gemm_constants(site: Site, x: Operand, weight, bias, offset: int = 0):
    """A GEMM's integer constants: its weight as integers, one row per output channel (``weight.flatten(1)``; a
    float tensor holding them), per-channel symmetric at the site's width (its output observer's ``weight_bits``:
    8, or 4 for W4A8; GPTQ's integers or scales where :mod:`iseg_plugin.gptq` set them); its INT32 bias at
    ``S_x S_w`` plus ``offset * sum(W)`` (None if neither); and the accumulator's requantization to the output.
    Returns ``(weight integers, bias integers, Requant, output scale, output bounds)``."""
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
    return w_int, b_int, out, scale, bounds


def _linear_module(site: Site, x: Operand, weight, bias, offset: int = 0) -> tuple[M.Linear, float, tuple[int, int]]:
    """W x + b as ``W (x - offset) + (b + offset * sum(W))``: ``offset`` brings a 256-level input such as
    an asymmetric GELU output into int8, and the bias takes it back (exact)."""
    w_int, b_int, out, scale, bounds = _gemm_constants(site, x, weight, bias, offset)
    linear = M.Linear(site.lowering.integers(w_int, torch.int8), b_int, out, offset, site.observer.weight_bits)
    return linear, scale, bounds


def _int8_offset(x) -> int:
    """The shift that brings an operand on an asymmetric 256-level grid into int8; 0 for other operands."""
    return x.grid.int8_offset if isinstance(x, Operand) else 0


_AS_IS = lambda value, dtype: value  # noqa: E731 - a build's ``integers`` outside the lowering: the tensor as it is


def lower_built(site: Site, variant: Variant) -> Operand:
    """The usual lowering: the variant's ``build`` from the input's grid (at the entry's input width), the op's
    attributes and its output grid (the observed one; an op without an observer keeps its input's grid, and its
    input's observed range, which bounds its output's: a ReLU on the INT16 stream narrowed to INT8 for a conv)."""
    x = site.input(0)
    out = site.output_grid() if site.observer is not None else None
    node = site.emit(variant.build(site.attrs, (x.grid,), out, site.lowering.integers), x.node)
    if out is None:
        return Operand(node, x.scale, x.bounds, x.observer)
    return site.out(node, out.scale, out.bounds)


# -- linear, conv2d, conv_transpose2d --------------------------------------------------------------

def _lower_linear(site: Site, variant: Variant) -> Operand:
    offset = _int8_offset(site.args[0])
    x = site.args[0] if offset else site.input(0)
    module, scale, bounds = _linear_module(site, x, site.attrs["weight"], site.attrs["bias"], offset)
    return site.out(site.emit(module, x.node), scale, bounds)


def _linear_attributes(call) -> dict:
    if call.module is not None:
        return dict(weight=call.module.weight, bias=call.module.bias)
    return dict(weight=call.arg(1, "weight"), bias=call.arg(2, "bias"))


def _pair(value) -> tuple[int, int]:
    """A Conv2d size argument (int, or a sequence of one or two) as (h, w)."""
    return tuple(value) * (2 // len(value)) if isinstance(value, (list, tuple)) else (value, value)


def _conv_attributes(call) -> dict:
    """Conv2d / ConvTranspose2d (module, F.conv*, aten.conv*): weight, bias and geometry."""
    transposed = isinstance(call.module, nn.ConvTranspose2d) or getattr(call, "target", None) in (
        F.conv_transpose2d, aten.conv_transpose2d.input)
    if call.module is not None:
        c = call.module
        a = dict(weight=c.weight, bias=c.bias, stride=c.stride, padding=c.padding, dilation=c.dilation,
                 groups=c.groups, padding_mode=c.padding_mode)
        if transposed:
            a["output_padding"] = c.output_padding
    elif transposed:  # (input, weight, bias, stride, padding, output_padding, groups, dilation)
        a = dict(weight=call.arg(1, "weight"), bias=call.arg(2, "bias"), stride=call.arg(3, "stride", 1),
                 padding=call.arg(4, "padding", 0), output_padding=call.arg(5, "output_padding", 0),
                 groups=call.arg(6, "groups", 1), dilation=call.arg(7, "dilation", 1), padding_mode="zeros")
    else:  # (input, weight, bias, stride, padding, dilation, groups); aten.conv2d.padding: padding a string
        a = dict(weight=call.arg(1, "weight"), bias=call.arg(2, "bias"), stride=call.arg(3, "stride", 1),
                 padding=call.arg(4, "padding", "valid" if getattr(call, "target", None) is aten.conv2d.padding else 0),
                 dilation=call.arg(5, "dilation", 1), groups=call.arg(6, "groups", 1), padding_mode="zeros")
    return dict(a, kernel=tuple(a["weight"].shape[-2:]), input_shape=call.input_shape(0))


def _conv_check(a: dict) -> str | None:
    if not isinstance(a["weight"], torch.Tensor):
        return ("its weight is computed in the model (from the input, or as a node the front end cannot evaluate), "
                "not a constant: the integer convolution quantizes constant weights once")
    return None


def _patchifying(a: dict) -> bool:
    """A Conv2d whose kernel equals its stride, unpadded, ungrouped, undilated, on an input the patches tile (ViT
    patch embedding): one GEMM over the patches (:class:`M.PatchConv`)."""
    unpadded = a["padding"] == "valid" or (not isinstance(a["padding"], str) and _pair(a["padding"]) == (0, 0))
    shape, kernel = a["input_shape"], a["kernel"]
    return (_pair(a["stride"]) == kernel and unpadded and a["groups"] == 1 and _pair(a["dilation"]) == (1, 1)
            and shape is not None and shape[-2] % kernel[0] == 0 and shape[-1] % kernel[1] == 0)


def _lower_conv(site: Site, variant: Variant) -> Operand:
    """A patch embedding as :class:`M.PatchConv`; any other geometry as :class:`M.Conv2d`, on a symmetric INT8
    input (padding with the integer 0 is padding with real 0; reflect / replicate / circular padding moves integers)."""
    x, a = site.input(0), site.attrs
    if _patchifying(a):
        module, scale, bounds = _linear_module(site, x, a["weight"], a["bias"])  # patches: (in, kh, kw)
        return site.out(site.emit(M.PatchConv(module, a["kernel"]), x.node), scale, bounds)
    w_int, b_int, out, scale, bounds = _gemm_constants(site, x, a["weight"], a["bias"])
    pads = intops.conv_padding(a["padding"], a["kernel"], a["stride"], a["dilation"])
    module = M.Conv2d(site.lowering.integers(w_int.reshape(a["weight"].shape), torch.int8), b_int, out,
                      _pair(a["stride"]), pads, _pair(a["dilation"]), a["groups"], a["padding_mode"],
                      site.observer.weight_bits)
    return site.out(site.emit(module, x.node), scale, bounds)


def _lower_conv_transpose(site: Site, variant: Variant) -> Operand:
    """:class:`M.ConvTranspose2d` on a symmetric INT8 input (the zeros spread between its entries are real 0); its
    weight (C_in, O/G, kh, kw) quantized per output channel, as the equivalent convolution's (O, C_in/G, kh, kw)."""
    x, a = site.input(0), site.attrs
    w, groups = a["weight"], a["groups"]
    cin, og, kh, kw = w.shape

    def swap(t):  # (C_in, O/G, kh, kw) <-> (O, C_in/G, kh, kw): the same per-group reshape both ways
        g, i, o = groups, t.shape[0] // groups, t.shape[1]
        return t.reshape(g, i, o, kh, kw).transpose(1, 2).reshape(g * o, i, kh, kw)

    w_int, b_int, out, scale, bounds = _gemm_constants(site, x, swap(w), a["bias"])
    w_int = site.lowering.integers(swap(w_int.reshape(og * groups, cin // groups, kh, kw)), torch.int8)
    module = M.ConvTranspose2d(w_int, b_int, out, _pair(a["stride"]), _pair(a["padding"]), _pair(a["output_padding"]),
                               _pair(a["dilation"]), groups)
    return site.out(site.emit(module, x.node), scale, bounds)


# -- matmul, add, mul ------------------------------------------------------------------------------

def _build_matmul(a: dict, inputs: tuple[Grid, Grid], out: Grid, integers=_AS_IS) -> M.MatMul:
    """``alpha * (a @ b)`` (``a["alpha"]``, default 1: a scale the requantization takes); ``a`` may be softmax
    probabilities (two int8 halves), else both operands are INT8."""
    in_scale = inputs[0].scale * inputs[1].scale * a.get("alpha", 1.0)
    return M.MatMul(inputs[0].kind == PROBABILITIES, M.Requant.between(in_scale, out.scale, out.bounds))


def _lower_matmul(site: Site, variant: Variant) -> Operand:
    a = site.args[0]
    a = a if isinstance(a, Operand) and a.grid.kind == PROBABILITIES else site.input(0, 8)
    b = site.input(1, 8)
    out = site.output_grid()
    module = variant.build(site.attrs, (a.grid, b.grid), out)
    return site.out(site.emit(module, a.node, b.node), out.scale, out.bounds)


def _add_attributes(call) -> dict:
    return dict(alpha=call.arg(2, "alpha", 1))


def _build_add(a: dict, inputs: tuple[Grid, Grid], out: Grid, integers=_AS_IS) -> M.Add:
    """Both operands requantized to the output's signed 8- or 16-bit grid, summed, saturated."""
    bits = 16 if out.bounds[1] > 127 else 8
    if out.bounds != intops.int_range(bits):
        raise ValueError(f"an integer add's output grid is signed INT8 or INT16, got bounds {out.bounds}")
    return M.Add(intops.dyadic_from_ratio(inputs[0].scale / out.scale),
                 intops.dyadic_from_ratio(inputs[1].scale / out.scale), bits)


def _lower_add(site: Site, variant: Variant) -> Operand:
    out = site.output_grid()
    bits = 16 if out.bounds[1] > 127 else 8
    parts = [site.args[0], site.args[1]]
    if not all(isinstance(p, (Operand, Const)) for p in parts):
        raise site.refuse("adding a Python number to a quantized tensor has no integer lowering")
    a, b = (p if isinstance(p, Operand) else site.lowering.quantized_constant(p, 16, f"{site.name}_const")
            for p in parts)
    module = variant.build(site.attrs, (a.grid, b.grid), out)
    return site.out(site.emit(module, a.node, b.node), out.scale, out.bounds)


def _lower_mul(site: Site, variant: Variant, divide: bool = False) -> Operand:
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
    out = site.output_grid()
    return site.out(site.emit(variant.build(site.attrs, (a.grid, b.grid), out), a.node, b.node), out.scale, out.bounds)


def _build_mul(a: dict, inputs: tuple[Grid, Grid], out: Grid, integers=_AS_IS) -> M.Mul:
    """The product of two quantized tensors (int64), requantized by ``S_a S_b / S_out``."""
    return M.Mul(M.Requant.between(inputs[0].scale * inputs[1].scale, out.scale, out.bounds))


# -- layer_norm, gelu, softmax, l2_normalize -------------------------------------------------------

def _layer_norm_attributes(call) -> dict:
    if call.module is not None:
        m = call.module
        shape, weight, bias, eps = m.normalized_shape, m.weight, m.bias, m.eps
    else:
        shape, weight, bias, eps = call.arg(1, "normalized_shape"), call.arg(2, "weight"), call.arg(3, "bias"), \
            call.arg(4, "eps", 1e-5)
    shape = tuple(shape) if isinstance(shape, (list, tuple, torch.Size)) else (shape,)
    input_shape = call.input_shape(0)
    channels = input_shape[-1] if input_shape is not None else next(
        (n for n in (shape[-1] if isinstance(shape[-1], int) else None, None if weight is None else weight.numel())
         if n is not None), None)  # (a traced model's x.shape[-1] is a node: the affine's size then)
    return dict(normalized_shape=shape, weight=weight, bias=bias, eps=eps, channels=channels)


def _layer_norm_check(a: dict) -> str | None:
    shape, channels = a["normalized_shape"], a["channels"]
    if len(shape) != 1 or (isinstance(shape[0], int) and channels is not None and shape != (channels,)):
        return f"I-LayerNorm normalises the last dimension only; got normalized_shape {shape}"
    if channels is None:
        return "the normalized size is computed in the model and there is no affine weight to read it from"
    return None


def _build_layer_norm(a: dict, inputs: tuple[Grid], out: Grid, integers=_AS_IS) -> M.LayerNorm:
    """I-LayerNorm: the affine as INT16 integers with its own scale (float32, as torch's LayerNorm computes it),
    the epsilon on the input's grid, the output requantization fused."""
    channels = a["channels"]
    weight = torch.ones(channels) if a["weight"] is None else a["weight"]
    bias = torch.zeros(channels) if a["bias"] is None else a["bias"]
    params = intops.layernorm_params(weight.float(), bias.float())
    params = params._replace(weight=integers(params.weight, torch.int64), bias=integers(params.bias, torch.int64))
    return M.LayerNorm(params, intops.layernorm_eps(a["eps"], inputs[0].scale),
                       M.Requant.between(params.out_scale, out.scale, out.bounds))


GELU_OUT_SHIFT = 7  # the GELUs' output is at S * 2**-7 before its requantization


class NoSamplesError(ValueError):
    """An operator fitted to calibration samples of its input saw none."""


def gelu_build(make):
    """A GELU variant's build: ``make(in_scale, out requantization, samples)``; the GELUs compute at
    ``S_in * 2**-7``, then requantize to the output grid. ``a["samples"]``: the input's calibration samples."""
    def build(a: dict, inputs: tuple[Grid], out: Grid, integers=_AS_IS) -> nn.Module:
        scale = inputs[0].scale
        return make(scale, M.Requant.between(scale * 2.0**-GELU_OUT_SHIFT, out.scale, out.bounds), a.get("samples"))

    return build


def _lower_gelu(site: Site, variant: Variant) -> Operand:
    x = site.input(0)
    # INT8 on an asymmetric grid where only GEMMs read it (unless the observer asks for a symmetric one)
    out = site.output_grid(asymmetric=not getattr(site.observer, "symmetric", False))
    samples = None if x.observer is None else x.observer.samples
    try:
        module = variant.build(dict(site.attrs, samples=samples), (x.grid,), out)
    except NoSamplesError as err:
        raise site.refuse(str(err)) from None
    return site.out(site.emit(module, x.node), out.scale, out.bounds)


def _poly_gelu(scale: float, out: M.Requant, samples) -> M.PolyGELU:
    if samples is None or samples.numel() == 0:
        raise NoSamplesError("Poly-GELU is fitted to calibration samples of its input, and none were observed")
    a, b = intops.fit_poly_gelu(samples)
    return M.PolyGELU(intops.poly_gelu_params(a, b, scale), out)


def _lambda_shift_gelu(scale: float, out: M.Requant, samples=None) -> M.LambdaShiftGELU:
    return M.LambdaShiftGELU(intops.lambda_shift_gelu_params(scale), out)


def _shift_gelu(scale: float, out: M.Requant, samples=None) -> M.ShiftGELU:
    return M.ShiftGELU(intops.exp_i0(scale), out)


def _softmax_attributes(call) -> dict:
    return dict(dim=call.module.dim if call.module is not None else call.arg(1, "dim"))


def _softmax_check(a: dict) -> str | None:
    return "softmax needs an explicit dim" if a["dim"] is None else None


def _bit_exp_softmax(a: dict, inputs: tuple[Grid], out=None, integers=_AS_IS) -> M.BitExpSoftmax:
    return M.BitExpSoftmax(intops.bit_exp_params(inputs[0].scale), SOFTMAX_BITS, a["dim"])


def _shiftmax(a: dict, inputs: tuple[Grid], out=None, integers=_AS_IS) -> M.Shiftmax:
    return M.Shiftmax(intops.exp_i0(inputs[0].scale), SOFTMAX_BITS, a["dim"])


def _lower_softmax(site: Site, variant: Variant) -> Operand:
    x = site.input(0)
    out = Grid.probabilities()
    return site.out(site.emit(variant.build(site.attrs, (x.grid,), None), x.node), out.scale, out.bounds)


def _normalize_attributes(call) -> dict:
    shape = call.input_shape(0)
    return dict(p=call.arg(1, "p", 2.0), dim=call.arg(2, "dim", 1), rank=None if shape is None else len(shape))


def _normalize_check(a: dict) -> str | None:
    last = (-1,) if a["rank"] is None else (-1, a["rank"] - 1)
    if a["p"] != 2 or not isinstance(a["dim"], int) or (a["rank"] is not None and a["dim"] not in last):
        return f"integer L2 normalisation is over the last dimension with p=2; got p={a['p']}, dim={a['dim']}"
    return None


def _build_l2_norm(a: dict, inputs: tuple[Grid], out: Grid, integers=_AS_IS) -> M.L2Norm:
    return M.L2Norm(L2_FRAC_BITS, M.Requant.between(2.0**-L2_FRAC_BITS, out.scale, out.bounds))


# -- interpolate, mean, cat, shape ops -------------------------------------------------------------

def _interpolate_attributes(call) -> dict:
    if call.module is not None:
        m = call.module
        return dict(mode=m.mode, align_corners=m.align_corners, size=m.size, scale_factor=m.scale_factor)
    target = getattr(call, "target", None)
    if target == aten.upsample_nearest2d.vec:
        return dict(mode="nearest", align_corners=None, size=call.arg(1, "output_size"), scale_factor=None)
    if target == aten.upsample_bilinear2d.vec:
        return dict(mode="bilinear", align_corners=call.arg(2, "align_corners"), size=call.arg(1, "output_size"),
                    scale_factor=None)
    return dict(mode=call.arg(3, "mode", "nearest"), align_corners=call.arg(4, "align_corners", None),
                size=call.arg(1, "size"), scale_factor=call.arg(2, "scale_factor"))


def _interpolate_check(a: dict) -> str | None:
    if a["mode"] not in ("nearest", "bilinear"):
        return f"integer upsampling is nearest or bilinear; got mode={a['mode']!r}"
    return None


def _build_upsample(a: dict, inputs: tuple[Grid], out=None, integers=_AS_IS) -> M.Upsample:
    """Nearest or integer bilinear resize to ``a["out_size"]`` (h, w), on the input's grid."""
    return M.Upsample(a["mode"], a["out_size"], None, a["mode"] == "bilinear" and bool(a["align_corners"]))


def _lower_interpolate(site: Site, variant: Variant) -> Operand:
    x = site.input(0, 16)
    module = variant.build(dict(site.attrs, out_size=site.shape()[-2:]), (x.grid,), None)
    return site.out(site.emit(module, x.node), x.scale, x.bounds)


def reduced_count(shape, dim) -> int:
    """How many elements a reduction over ``dim`` (one or several) of a ``shape`` tensor sums per output."""
    return math.prod(shape[d] for d in (dim if isinstance(dim, (list, tuple)) else (dim,)))


def _mean_attributes(call) -> dict:
    shape, dim = call.input_shape(0), call.arg(1, "dim")
    return dict(dim=dim, keepdim=bool(call.arg(2, "keepdim", False)),
                count=None if shape is None or dim is None else reduced_count(shape, dim))


def _mean_check(a: dict) -> str | None:
    return "mean over all dimensions: give dim" if a["dim"] is None else None


def _build_mean(a: dict, inputs: tuple[Grid], out: Grid, integers=_AS_IS) -> M.Mean:
    """An int64 sum of ``a["count"]`` elements, requantized by ``S_in / (count S_out)``."""
    return M.Mean(a["dim"], a["keepdim"], M.Requant.between(inputs[0].scale / a["count"], out.scale, out.bounds))


def cat_requant(part: Grid, out: Grid) -> M.Requant | None:
    """How a part enters a concatenation on ``out``: as it is (None) if it is already there."""
    if part.scale == out.scale and out.bounds[0] <= part.bounds[0] and part.bounds[1] <= out.bounds[1]:
        return None
    return M.Requant.between(part.scale, out.scale, out.bounds)


def _cat_attributes(call) -> dict:
    return dict(dim=call.arg(1, "dim", 0))


def _build_cat(a: dict, inputs: tuple[Grid | None, ...], out: Grid, integers=_AS_IS) -> M.Cat:
    """Each part requantized to the output grid unless it is on it (None: a constant already quantized to it)."""
    return M.Cat(a["dim"], [None if g is None else cat_requant(g, out) for g in inputs], M.storage_dtype(out.bounds))


def _lower_cat(site: Site, variant: Variant) -> Operand:
    parts = site.args[0] if site.args else site.kwargs["tensors"]  # Operands and Consts, not unwrapped
    out = site.output_grid()
    bits = 16 if out.bounds[1] > 127 else 8
    parts = [site.lowering.quantized_constant(p, bits, f"{site.name}_const{i}", scale=out.scale)
             if isinstance(p, Const) else p for i, p in enumerate(parts)]
    module = variant.build(site.attrs, tuple(p.grid for p in parts), out)
    return site.out(site.emit(module, *(p.node for p in parts)), out.scale, out.bounds)


_RELU = (F.relu, torch.relu, "relu", "relu_", aten.relu.default, aten.relu_.default)
_IN_PLACE = ("relu_", "clamp_", "clip_", aten.relu_.default, aten.hardtanh_.default, aten.clamp_.default)


def _clamp_attributes(call) -> dict:
    """The float bounds (None: unbounded) of ReLU, ReLU6, hardtanh and clamp / clip; whether the op writes its
    input in place while another op also reads that input (the integer op cannot change what that op reads)."""
    in_place = call.target in _IN_PLACE or bool(getattr(call.module, "inplace", False)) or (
        call.target in (F.relu, F.relu6, F.hardtanh) and bool(call.node.kwargs.get("inplace", False)))
    source = call.node.args[0]
    shared = in_place and isinstance(source, fx.Node) and len(source.users) > 1
    if isinstance(call.module, nn.Hardtanh):  # (ReLU6 is a Hardtanh)
        return dict(min=call.module.min_val, max=call.module.max_val, shared_in_place=shared)
    if isinstance(call.module, nn.ReLU) or call.target in _RELU:
        return dict(min=0.0, max=None, shared_in_place=shared)
    if call.target is F.relu6:
        return dict(min=0.0, max=6.0, shared_in_place=shared)
    if call.target in (F.hardtanh, aten.hardtanh.default, aten.hardtanh_.default):
        return dict(min=call.arg(1, "min_val", -1.0), max=call.arg(2, "max_val", 1.0), shared_in_place=shared)
    return dict(min=call.arg(1, "min"), max=call.arg(2, "max"), shared_in_place=shared)


def _clamp_check(a: dict) -> str | None:
    if a["shared_in_place"]:
        return ("it clamps its input in place while another op reads that input: the integer model cannot reproduce "
                "the mutation; make it out of place (inplace=False)")
    low, high = a["min"], a["max"]
    if not all(v is None or isinstance(v, (int, float)) and math.isfinite(v) for v in (low, high)):
        return "clamping to bounds that are tensors or not finite has no integer lowering: give numbers"
    if low is not None and high is not None and low > high:
        return f"clamp bounds min={low} > max={high}"
    return None


def _build_clamp(a: dict, inputs: tuple[Grid], out=None, integers=_AS_IS) -> M.Clamp:
    """The bounds on the input's grid (:func:`intops.clamp_bounds`), within the grid's own bounds."""
    grid = inputs[0]
    low, high = intops.clamp_bounds(grid.scale, a["min"], a["max"])
    return M.Clamp((grid.bounds[0] if low is None else max(grid.bounds[0], low),
                    grid.bounds[1] if high is None else min(grid.bounds[1], high)))


# -- sigmoid family, pooling --------------------------------------------------------------------------

SIGMOID_BITS = 16  # a sigmoid's output: [0, 2**15] at 2**-15, as the softmax probabilities


def _build_sigmoid(a: dict, inputs: tuple[Grid], out: Grid, integers=_AS_IS) -> M.Sigmoid:
    """The integer sigmoid of the input at 2**-15, requantized to the output grid (quick-GELU's
    ``x * sigmoid(1.702 x)`` is this and the ``mul`` entry: ``1.702 x`` is a scale change)."""
    params = intops.sigmoid_params(inputs[0].scale)
    return M.Sigmoid(params, SIGMOID_BITS, intops.K_INTER_SIGMOID,
                     M.Requant.between(2.0 ** -(SIGMOID_BITS - 1), out.scale, out.bounds))


def _build_silu(a: dict, inputs: tuple[Grid], out: Grid, integers=_AS_IS) -> M.XSigmoid:
    """``x * sigmoid(x)`` of INT8 input at ``S * 2**-7`` (as the GELUs), requantized."""
    scale = inputs[0].scale
    return M.XSigmoid(intops.sigmoid_params(scale), GELU_OUT_SHIFT + 1, intops.K_INTER_SIGMOID,
                      M.Requant.between(scale * 2.0**-GELU_OUT_SHIFT, out.scale, out.bounds))


def _hard_build(swish: bool):
    """Hardsigmoid (INT16 input, output at 2**-15) or hardswish (INT8 input, ``x * h`` at ``S * 2**-7``)."""
    def build(a: dict, inputs: tuple[Grid], out: Grid, integers=_AS_IS) -> M.HardSigmoid:
        scale = inputs[0].scale
        bits = GELU_OUT_SHIFT + 1 if swish else SIGMOID_BITS
        out_of = (scale if swish else 1.0) * 2.0 ** -(bits - 1)
        return M.HardSigmoid(intops.hard_params(scale, bits), swish, M.Requant.between(out_of, out.scale, out.bounds))

    return build


# float pooling function / ATen op -> (dims, adaptive)
_AVG_POOLS = {torch.avg_pool1d: (1, False), F.avg_pool2d: (2, False), aten.avg_pool1d.default: (1, False),
              aten.avg_pool2d.default: (2, False),
              torch.adaptive_avg_pool1d: (1, True), F.adaptive_avg_pool2d: (2, True),
              aten.adaptive_avg_pool1d.default: (1, True), aten.adaptive_avg_pool2d.default: (2, True),
              aten._adaptive_avg_pool2d.default: (2, True)}
_MAX_POOLS = {F.max_pool1d: 1, F.max_pool2d: 2, aten.max_pool1d.default: 1, aten.max_pool2d.default: 2}


def _pool_module_dims(module: nn.Module) -> int:
    return 1 if type(module).__name__.endswith("1d") else 2


def _avg_pool_attributes(call) -> dict:
    shape, m = call.input_shape(0), call.module
    if m is not None:
        dims, adaptive = _pool_module_dims(m), "Adaptive" in type(m).__name__
    else:
        dims, adaptive = _AVG_POOLS[call.target]
    if adaptive:
        size = m.output_size if m is not None else call.arg(1, "output_size")
        return dict(dims=dims, adaptive=True, output_size=size, input_shape=shape)
    if m is not None:
        args = (m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad, getattr(m, "divisor_override", None))
    else:
        args = (call.arg(1, "kernel_size"), call.arg(2, "stride"), call.arg(3, "padding", 0),
                call.arg(4, "ceil_mode", False), call.arg(5, "count_include_pad", True), call.arg(6, "divisor_override"))
    names = ("kernel", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
    return dict(dims=dims, adaptive=False, input_shape=shape, **dict(zip(names, args)))


def _float_avg_pool(a: dict, x: Tensor) -> Tensor:
    d = a["dims"]
    if a["adaptive"]:
        return (torch.adaptive_avg_pool1d if d == 1 else F.adaptive_avg_pool2d)(x, a["output_size"])
    pool = torch.avg_pool1d if d == 1 else F.avg_pool2d
    extra = () if d == 1 else (a["divisor_override"],)
    return pool(x, a["kernel"], a["stride"] or a["kernel"], a["padding"], a["ceil_mode"], a["count_include_pad"], *extra)


def _build_avg_pool(a: dict, inputs: tuple[Grid], out: Grid, integers=_AS_IS) -> M.AvgPool:
    """Window sums through static tables, one dyadic multiplier per output position (``S_in / (count S_out)``)."""
    size, scale = a["input_shape"][-a["dims"]:], inputs[0].scale
    if a["adaptive"]:
        params = intops.adaptive_avg_pool_params(size, a["output_size"], scale, out.scale)
    else:
        params = intops.avg_pool_params(size, a["kernel"], a["stride"], a["padding"], a["ceil_mode"],
                                        a["count_include_pad"], a["divisor_override"], scale, out.scale)
    return M.AvgPool(params, out.bounds)


def _max_pool_attributes(call) -> dict:
    m = call.module
    if m is not None:
        dims, args = _pool_module_dims(m), (m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
                                            m.return_indices)
    else:
        dims = _MAX_POOLS[call.target]
        args = (call.arg(1, "kernel_size"), call.arg(2, "stride"), call.arg(3, "padding", 0), call.arg(4, "dilation", 1),
                call.arg(5, "ceil_mode", False), call.arg(6, "return_indices", False))
    names = ("kernel", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    return dict(dims=dims, input_shape=call.input_shape(0), **dict(zip(names, args)))


def _float_max_pool(a: dict, x: Tensor) -> Tensor:
    pool = F.max_pool1d if a["dims"] == 1 else F.max_pool2d
    return pool(x, a["kernel"], a["stride"] or a["kernel"], a["padding"], a["dilation"], a["ceil_mode"])


def _build_max_pool(a: dict, inputs: tuple[Grid], out=None, integers=_AS_IS) -> M.MaxPool:
    size = a["input_shape"][-a["dims"]:]
    return M.MaxPool(intops.max_pool_params(size, a["kernel"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"]))


def _lower_shape_op(site: Site, variant: Variant) -> Operand | Const:
    """Shape ops move integers without changing them: the same call on the integer tensor."""
    source = next(a for a in site.args + list(site.kwargs.values()) if isinstance(a, Operand))
    node = site.node
    if node.op == "call_module":  # Dropout / Identity in eval: nothing
        return source
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


def _pad_attributes(call) -> dict:
    target = getattr(call, "target", None)
    if target not in (F.pad, aten.pad.default, aten.constant_pad_nd.default):
        return {}
    if target is aten.constant_pad_nd.default:
        return dict(mode="constant", value=call.arg(2, "value", 0))
    return dict(mode=call.arg(2, "mode", "constant"), value=call.arg(3, "value", 0))


def _pad_check(a: dict) -> str | None:
    # reflect / replicate / circular copy the input's integers (a Conv2d's padding_mode, as torch.export records it)
    if a and a["mode"] == "constant" and a["value"] not in (0, 0.0, None):
        return f"padding with a constant other than 0 has no integer lowering yet; got value={a['value']}"
    return None


def _single(doc: str, lower=lower_built, build=None) -> dict[str, Variant]:
    return {"default": Variant("default", lower, doc, build)}


_IDENTITY_METHODS = ("float", "to", "type_as", "clone", "detach")
# (dtype casts too: the float model casts float32 to float32, the integer model must keep its integers)
_IDENTITY_ATEN = (aten.clone.default, aten.alias.default, aten.detach.default, aten.to.dtype, aten._to_copy.default,
                  aten.dropout.default)
# ``contiguous`` is no identity: it is called on the integers, because a ``view`` after it needs its layout
# (nn.MultiheadAttention: ``...transpose(...).contiguous().view(...)``)
# Permutations and repetitions (Swin's shifted windows roll, DPT's readout expand_as) move integers too.
# Gathers by indices that do not depend on the input's values (ViT-MAE's token shuffle) move integers too.
SHAPE_METHODS = ("reshape", "view", "permute", "transpose", "t", "flatten", "unflatten", "expand", "squeeze",
                 "unsqueeze", "contiguous", "roll", "flip", "repeat", "expand_as", "gather", "index_select",
                 "take_along_dim") + _IDENTITY_METHODS
SHAPE_ATEN = (aten.view.default, aten.reshape.default, aten.permute.default, aten.transpose.int, aten.t.default,
              aten.flatten.using_ints, aten.unflatten.int, aten.expand.default, aten.squeeze.dim, aten.squeeze.dims,
              aten.unsqueeze.default, aten.slice.Tensor, aten.select.int, aten.pad.default,
              aten.constant_pad_nd.default, aten.contiguous.default, aten.roll.default, aten.flip.default,
              aten.repeat.default, aten.expand_as.default, aten.gather.default, aten.index_select.default,
              aten.index.Tensor)

REGISTRY.register(OpEntry(
    "linear", "INT8 x INT8 -> INT32 (+ INT32 bias), per-channel dyadic requantization to the output",
    modules=(nn.Linear,), functions=(F.linear,), aten=(aten.linear.default,), input_bits=8,
    variants=_single("int8 GEMM, requantization fused in the module", _lower_linear),
    attributes=_linear_attributes, emits=("Linear",)))
REGISTRY.register(OpEntry(
    "conv2d", "Conv2d of any geometry (kernel, stride, padding, dilation, groups): INT8 x INT8 -> INT32 + INT32 bias, "
    "per-channel requantization; a patch embedding as one GEMM over its patches",
    modules=(nn.Conv2d,), functions=(F.conv2d,), aten=(aten.conv2d.default, aten.conv2d.padding), input_bits=8,
    variants=_single("patch embedding: patches @ W^T; else im2col @ W^T per group (exact, intops.conv2d_acc)",
                     _lower_conv), attributes=_conv_attributes, check=_conv_check,
    emits=("PatchConv", "Linear", "Conv2d")))
REGISTRY.register(OpEntry(
    "conv_transpose2d", "ConvTranspose2d of any geometry: INT8 x INT8 -> INT32 + INT32 bias, per-channel "
    "requantization", modules=(nn.ConvTranspose2d,), functions=(F.conv_transpose2d,),
    aten=(aten.conv_transpose2d.input,), input_bits=8,
    variants=_single("input spread by the stride, im2col @ flipped W^T (exact, intops.conv_transpose2d_acc)",
                     _lower_conv_transpose), attributes=_conv_attributes, check=_conv_check,
    emits=("ConvTranspose2d",)))
REGISTRY.register(OpEntry(
    "matmul", "activation @ activation: INT8 x INT8, or UINT16 probabilities x INT8 (two int8 halves)",
    functions=(torch.matmul, operator.matmul, torch.bmm), methods=("matmul", "bmm"),
    aten=(aten.matmul.default, aten.bmm.default), input_bits=8,
    variants=_single("int32 accumulator, requantized", _lower_matmul, _build_matmul), emits=("MatMul",)))
REGISTRY.register(OpEntry(
    "add", "residual / embedding add: both operands requantized to the output scale (INT16 stream)",
    functions=(operator.add, torch.add, operator.iadd), methods=("add",), aten=(aten.add.Tensor,), input_bits=None,
    variants=_single("requantize_add", _lower_add, _build_add), attributes=_add_attributes,
    check=lambda a: "add with alpha != 1 has no integer lowering" if a["alpha"] != 1 else None, emits=("Add",)))
REGISTRY.register(OpEntry(
    "mul", "x * c (scalar: a scale change, no op; per channel: one requantization) or x * y, and x / c",
    functions=(operator.mul, torch.mul), methods=("mul",), aten=(aten.mul.Tensor,), input_bits=None,
    variants=_single("dyadic rescale", _lower_mul, _build_mul), emits=("Mul", "Requant")))
REGISTRY.register(OpEntry(
    "div", "x / c for a constant c: a scale change",
    functions=(operator.truediv, torch.div), methods=("div",), aten=(aten.div.Tensor,), input_bits=None,
    variants=_single("dyadic rescale", lambda site, variant: _lower_mul(site, variant, divide=True)),
    emits=("Requant",)))
REGISTRY.register(OpEntry(
    "layer_norm", "I-LayerNorm over the last dimension, fused with its output requantization",
    modules=(nn.LayerNorm,), functions=(F.layer_norm,), aten=(aten.layer_norm.default,), input_bits=16,
    variants=_single("exact isqrt, INT16 gamma, int64 sums", build=_build_layer_norm),
    attributes=_layer_norm_attributes, check=_layer_norm_check, emits=("LayerNorm",)))
REGISTRY.register(OpEntry(
    "gelu", "integer GELU of INT8 input, output S * 2**-7 requantized (GELU's tanh approximation, within 4.7e-4 of "
    "erf GELU, is lowered the same)",
    modules=(nn.GELU,), functions=(F.gelu,), aten=(aten.gelu.default,), input_bits=8,
    variants={
        "poly": Variant("poly", _lower_gelu, "Poly-GELU (IPTQ-ViT): quartic erf fitted on calibration data",
                        gelu_build(_poly_gelu)),
        "lambda-shift": Variant("lambda-shift", _lower_gelu,
                                "lambda-ShiftGELU (I-Segmenter): sigmoid reference capped at lambda = 6",
                                gelu_build(_lambda_shift_gelu)),
        "shift": Variant("shift", _lower_gelu, "ShiftGELU (I-ViT): x * sigmoid(1.6875 x) by ShiftExp",
                         gelu_build(_shift_gelu)),
    }, emits=("PolyGELU", "LambdaShiftGELU", "ShiftGELU")))
REGISTRY.register(OpEntry(
    "softmax", "integer softmax of INT16 logits; probabilities UINT16-range [0, 2**15], scale 2**-15",
    modules=(nn.Softmax,), functions=(F.softmax, torch.softmax), methods=("softmax",),
    aten=(aten.softmax.int, aten._softmax.default), input_bits=16,
    variants={
        "bit-exp": Variant("bit-exp", _lower_softmax,
                           "bit-exp softmax (IPTQ-ViT, our reading): exact log2 e, quadratic 2**u", _bit_exp_softmax),
        "shift": Variant("shift", _lower_softmax, "Shiftmax (I-ViT)", _shiftmax),
    }, attributes=_softmax_attributes, check=_softmax_check, emits=("BitExpSoftmax", "Shiftmax")))
REGISTRY.register(OpEntry(
    "l2_normalize", "integer L2 normalisation over the last dimension (F.normalize, p=2)",
    functions=(F.normalize,), input_bits=16, variants=_single("exact isqrt, 15 fraction bits", build=_build_l2_norm),
    attributes=_normalize_attributes, check=_normalize_check, emits=("L2Norm",)))
REGISTRY.register(OpEntry(
    "interpolate", "nearest, or integer bilinear with exact rational weights (align_corners False or True)",
    modules=(nn.Upsample,), functions=(F.interpolate,),
    aten=(aten.upsample_nearest2d.vec, aten.upsample_bilinear2d.vec), input_bits=16,
    variants=_single("same scale as the input", _lower_interpolate, _build_upsample),
    attributes=_interpolate_attributes, check=_interpolate_check, emits=("Upsample",)))
REGISTRY.register(OpEntry(
    "mean", "mean over dims: int64 sum, one requantization by S_in / (n S_out)",
    functions=(torch.mean,), methods=("mean",), aten=(aten.mean.dim,), input_bits=16,
    variants=_single("sum + requant", build=_build_mean), attributes=_mean_attributes, check=_mean_check,
    emits=("Mean",)))
REGISTRY.register(OpEntry(
    "cat", "concatenation at the output scale (constants such as cls tokens quantized to it)",
    functions=(torch.cat, torch.concat), aten=(aten.cat.default,), input_bits=None,
    variants=_single("requantize, then cat", _lower_cat, _build_cat), attributes=_cat_attributes, emits=("Cat",)))
REGISTRY.register(OpEntry(
    "clamp", "ReLU / ReLU6 / hardtanh / clamp: the integers clamped on their own grid",
    modules=(nn.ReLU, nn.Hardtanh), functions=(F.relu, torch.relu, F.relu6, F.hardtanh, torch.clamp, torch.clip),
    methods=("relu", "clamp", "clip", "relu_", "clamp_", "clip_"),
    aten=(aten.relu.default, aten.hardtanh.default, aten.clamp.default, aten.relu_.default, aten.hardtanh_.default,
          aten.clamp_.default),
    observation="share", input_bits=None, variants=_single("integer clamp", build=_build_clamp),
    attributes=_clamp_attributes, check=_clamp_check, float_op=lambda a, x: x.clamp(a["min"], a["max"]),
    emits=("Clamp",)))
REGISTRY.register(OpEntry(
    "sigmoid", "integer sigmoid (bit-exp exponential, one division) at 2**-15, requantized; with mul: quick-GELU",
    modules=(nn.Sigmoid,), functions=(torch.sigmoid, F.sigmoid), methods=("sigmoid",), aten=(aten.sigmoid.default,),
    input_bits=16, variants=_single("exactly symmetric, max error 1e-3", build=_build_sigmoid),
    float_op=lambda a, x: torch.sigmoid(x), emits=("Sigmoid",)))
REGISTRY.register(OpEntry(
    "silu", "SiLU x * sigmoid(x) of INT8 input at S * 2**-7, requantized",
    modules=(nn.SiLU,), functions=(F.silu,), aten=(aten.silu.default,), input_bits=8,
    variants=_single("integer sigmoid times x", build=_build_silu), float_op=lambda a, x: F.silu(x),
    emits=("XSigmoid",)))
REGISTRY.register(OpEntry(
    "hardsigmoid", "hardsigmoid relu6(x + 3) / 6 by one dyadic multiply, at 2**-15, requantized",
    modules=(nn.Hardsigmoid,), functions=(F.hardsigmoid,), aten=(aten.hardsigmoid.default,), input_bits=16,
    variants=_single("within half an output unit", build=_hard_build(False)), float_op=lambda a, x: F.hardsigmoid(x),
    emits=("HardSigmoid",)))
REGISTRY.register(OpEntry(
    "hardswish", "hardswish x * relu6(x + 3) / 6 of INT8 input at S * 2**-7, requantized",
    modules=(nn.Hardswish,), functions=(F.hardswish,), aten=(aten.hardswish.default,), input_bits=8,
    variants=_single("x times the integer hardsigmoid", build=_hard_build(True)), float_op=lambda a, x: F.hardswish(x),
    emits=("HardSigmoid",)))
REGISTRY.register(OpEntry(
    "avg_pool", "average and adaptive average pooling (1d, 2d): window sums, one requantization per output position",
    modules=(nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d), functions=tuple(
        t for t in _AVG_POOLS if not isinstance(t, torch._ops.OpOverload)),
    aten=tuple(t for t in _AVG_POOLS if isinstance(t, torch._ops.OpOverload)), input_bits=16,
    variants=_single("PyTorch's divisors, within 0.5 LSB", build=_build_avg_pool), attributes=_avg_pool_attributes,
    float_op=_float_avg_pool, emits=("AvgPool",)))
REGISTRY.register(OpEntry(
    "max_pool", "max pooling (1d, 2d): exact, on the input's grid",
    modules=(nn.MaxPool1d, nn.MaxPool2d), functions=(F.max_pool1d, F.max_pool2d),
    aten=(aten.max_pool1d.default, aten.max_pool2d.default),
    observation="share", input_bits=None, variants=_single("window max", build=_build_max_pool),
    attributes=_max_pool_attributes, check=lambda a: "max pooling with return_indices has no integer lowering (the "
    "indices are positions, not values)" if a["return_indices"] else None, float_op=_float_max_pool,
    emits=("MaxPool",)))
REGISTRY.register(OpEntry(
    "shape", "reshape / permute / index / roll / flip / repeat / gather by static indices / pad (0, reflect, replicate, "
    "circular) / dropout in eval: the same call on the integers",
    modules=(nn.Dropout, nn.Identity), functions=(operator.getitem, torch.flatten, torch.transpose, torch.permute,
                                                   torch.reshape, torch.squeeze, torch.unsqueeze, torch.roll,
                                                   torch.flip, F.pad, F.dropout, torch.gather, torch.index_select,
                                                   torch.take_along_dim),
    methods=SHAPE_METHODS, aten=SHAPE_ATEN + _IDENTITY_ATEN, observation="share", input_bits=None,
    variants=_single("no arithmetic", _lower_shape_op), attributes=_pad_attributes, check=_pad_check))
REGISTRY.register(OpEntry(
    "split", "chunk / split / unbind: tuples of integer tensors (not observed: torch.ao observes tensors only)",
    functions=(torch.chunk, torch.split, torch.unbind), methods=("chunk", "split", "unbind"),
    aten=(aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int), observation="none",
    input_bits=None, variants=_single("no arithmetic", _lower_shape_op)))

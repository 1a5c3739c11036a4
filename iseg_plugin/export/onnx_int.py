"""Integer-only ONNX: the deployed model's forward, traced, with exact integer lowerings.

The graph is the trace of :class:`~iseg_plugin.deploy.DeployedSegmenter`'s forward (TorchScript
exporter), so it computes the very ``intops`` arithmetic the PyTorch model runs; no operator is
written a second time. What torch's standard ONNX symbolics would get wrong for integers is
lowered here instead (registered only for the duration of the export):

* int8 GEMMs become ``MatMulInteger`` (see :class:`~iseg_plugin.ops.gemm._Int8MatMul`): uint8 x int8 where
  the exporting CPU has AVX-512 VNNI (onnxruntime's fast kernel, exact there), else uint8 x uint8 (exact
  everywhere); the form is recorded in the file (with what a uint8 x int8 graph requires) and
  :func:`onnx_session` refuses a graph with uint8 x int8 GEMMs (read from its types) on a CPU where it
  would not be exact;
* arithmetic shifts become uint64 ``BitShift``s around an offset of 2**63 (``BitShift`` is unsigned
  only; see :func:`expand_shifts`), constant left shifts multiplications;
* floor divisions become exact ``Div``s (``Div`` truncates toward zero; see :func:`_floor_div`);
* clamps of int32 tensors become ``Clip``; clamps of int64 tensors, minimum and maximum become
  comparisons + ``Where``, sign comparisons and a subtraction (onnxruntime 1.31's int64 ``Min`` /
  ``Max`` / ``Clip`` / ``Sign`` kernels are not exact on large tensors with values beyond 31 bits);
* ``ArgMax`` reads the INT16 logits through int32 (onnxruntime has no int16 ArgMax).

:func:`check_integer_only` then proves from the graph itself that every tensor is integer-typed.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import onnx
import torch
from onnx import TensorProto

from ..deploy.segmenter import DeployedSegmenter
from ..files import atomic_write
from ..ops.gemm import ONNX_GEMMS, cpu_isa, onnx_gemm, onnx_gemm_for_this_cpu

OPSET = 18
IR_VERSION = 10  # onnxruntime 1.31 reads IR <= 13; onnx 1.23 writes 14 (ecosystem notes B3)
INTEGER_TYPES = {TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16, TensorProto.INT32,
                 TensorProto.UINT32, TensorProto.INT64, TensorProto.UINT64, TensorProto.BOOL}


GEMM_KEY = "iseg_plugin.gemm"  # metadata: the MatMulIntegers' operand types (an entry of ONNX_GEMMS)
REQUIRES_KEY = "iseg_plugin.requires"  # metadata: what a CPU needs for the graph's results to be exact
U8S8_NEEDS = ("a CPU with AVX-512 VNNI: onnxruntime's uint8 x int8 MatMulInteger gives wrong results elsewhere "
              "(export with --gemm u8u8 for any CPU)")

# Placeholder nodes of the export, expanded into standard ops before the graph is checked or saved.
SHIFT_DOMAIN = "iseg_plugin.lowering"
_TOP_BIT = 1 << 63


class NotIntegerOnlyError(ValueError):
    """An ONNX graph holds or computes a non-integer tensor."""


def _dtype(x) -> torch.dtype:
    from torch.onnx._internal.torchscript_exporter._type_utils import JitScalarType

    return JitScalarType.from_value(x, JitScalarType.INT64).dtype()


def _onnx_type(x) -> int:
    """The ONNX element type of a traced value."""
    from torch.onnx._internal.torchscript_exporter._type_utils import JitScalarType

    return JitScalarType.from_dtype(_dtype(x)).onnx_type()


def _const(g, value: int, like):
    """An integer constant of ``like``'s dtype."""
    return g.op("Constant", value_t=torch.tensor(value, dtype=_dtype(like)))


def _cast_like(g, y, like):
    """``y`` as ``like``'s dtype: a constant is made in that dtype, a tensor is cast if it differs."""
    value = _const_int(y)
    if value is not None:
        return _const(g, value, like)
    if _dtype(y) == _dtype(like):
        return y
    return g.op("Cast", y, to_i=_onnx_type(like))


def _const_int(value) -> int | None:
    from torch.onnx import symbolic_helper

    v = symbolic_helper._maybe_get_const(value, "i")
    return v if isinstance(v, int) else None


def _floor_div(g, x, d):
    """floor(x / d), exactly (``Div`` truncates toward zero).

    A positive constant divisor: negative ``x`` is moved down by ``d - 1`` first, so truncation
    floors (~1.4x faster in onnxruntime than the general form). Otherwise the floored remainder is
    removed first: ``(x - Mod(x, d)) / d``. (Shifts take neither: see :func:`_shift`.)
    """
    value = _const_int(d)
    d = _cast_like(g, d, x)
    if value is not None and value > 0:
        moved = g.op("Where", g.op("Less", x, _const(g, 0, x)), g.op("Sub", x, _const(g, value - 1, x)), x)
        return g.op("Div", moved, d)
    return g.op("Div", g.op("Sub", x, g.op("Mod", x, d, fmod_i=0)), d)


def _shift(g, x, shift, direction: str):
    """An arithmetic shift, as a placeholder node that :func:`expand_shifts` turns into uint64
    ``BitShift``s after the export (the TorchScript exporter has no uint64 type). A constant left
    shift is a multiplication."""
    amount = _const_int(shift)
    if direction == "LEFT" and amount is not None:
        return g.op("Mul", x, _const(g, 1 << amount, x))
    inputs, attrs = ([x, shift], {}) if amount is None else ([x], {"amount_i": amount})
    out = g.op(f"{SHIFT_DOMAIN}::ArithmeticShift", *inputs, direction_s=direction,
               to_i=_onnx_type(x), **attrs)
    out.setType(g.original_node.output().type())
    return out


def _right_shift(g, x, shift):
    return _shift(g, x, shift, "RIGHT")


def _left_shift(g, x, shift):
    return _shift(g, x, shift, "LEFT")


def _div(g, x, y, *args):
    from torch.onnx import symbolic_helper

    mode = symbolic_helper._maybe_get_const(args[0], "s") if args else None
    if mode == "floor":
        return _floor_div(g, x, y)
    if mode == "trunc":
        return g.op("Div", x, _cast_like(g, y, x))
    raise NotIntegerOnlyError(f"{_where(g)}: a true division (rounding_mode=None) has no integer lowering")


def _where(g) -> str:
    """The module a symbolic is lowering an op of (its scope in the traced graph)."""
    return g.original_node.scopeName() or "the model"


def _remainder(g, x, y):
    return g.op("Mod", x, _cast_like(g, y, x), fmod_i=0)


def _is_none(value) -> bool:
    return value is None or (hasattr(value, "node") and value.node().mustBeNone())


def _bound(g, x, bound, keep_above: bool):
    """max(x, bound) (``keep_above``) or min(x, bound) by comparison; ``bound`` may be None."""
    if _is_none(bound):
        return x
    b = _cast_like(g, bound, x)
    return g.op("Where", g.op("Less" if keep_above else "Greater", x, b), b, x)


def _clamp(g, x, lo, hi):
    if _dtype(x) == torch.int16:  # onnxruntime has no int16 Where or Clip: clamped as int32, cast back
        wide = g.op("Cast", x, to_i=onnx.TensorProto.INT32)
        wide.setType(x.type().with_dtype(torch.int32))
        return g.op("Cast", _clamp(g, wide, lo, hi), to_i=onnx.TensorProto.INT16)
    if _dtype(x) != torch.int32:
        return _bound(g, _bound(g, x, lo, True), hi, False)
    info = torch.iinfo(torch.int32)  # int32: Clip is exact there, and ~6x faster than two Wheres
    lo = _const(g, info.min, x) if _is_none(lo) else _cast_like(g, lo, x)
    hi = _const(g, info.max, x) if _is_none(hi) else _cast_like(g, hi, x)
    return g.op("Clip", x, lo, hi)


def _clamp_min(g, x, lo):
    return _clamp(g, x, lo, None)


def _clamp_max(g, x, hi):
    return _clamp(g, x, None, hi)


def _minimum(g, a, b):
    return g.op("Where", g.op("Less", a, b), a, b)


def _maximum(g, a, b):
    return g.op("Where", g.op("Greater", a, b), a, b)


def _sign(g, x):
    zero, to = _const(g, 0, x), _onnx_type(x)
    return g.op("Sub", g.op("Cast", g.op("Greater", x, zero), to_i=to), g.op("Cast", g.op("Less", x, zero), to_i=to))


def _argmax(g, x, dim, keepdim):
    axis = _const_int(dim)
    keep = _const_int(keepdim) or 0
    return g.op("ArgMax", g.op("Cast", x, to_i=TensorProto.INT32), axis_i=axis, keepdims_i=keep)


_SYMBOLICS = {
    "aten::bitwise_right_shift": _right_shift,
    "aten::__rshift_": _right_shift,  # (the exporter drops the last underscore of dunder names)
    "aten::bitwise_left_shift": _left_shift,
    "aten::__lshift_": _left_shift,
    "aten::floor_divide": _floor_div,
    "aten::div": _div,
    "aten::remainder": _remainder,
    "aten::clamp": _clamp,
    "aten::clamp_min": _clamp_min,
    "aten::clamp_max": _clamp_max,
    "aten::minimum": _minimum,
    "aten::maximum": _maximum,
    "aten::sign": _sign,
    "aten::argmax": _argmax,
}


@contextlib.contextmanager
def integer_symbolics():
    """The integer lowerings above, registered for one export and removed after it."""
    for name, fn in _SYMBOLICS.items():
        torch.onnx.register_custom_op_symbolic(name, fn, OPSET)
    try:
        yield
    finally:
        for name in _SYMBOLICS:
            torch.onnx.unregister_custom_op_symbolic(name, OPSET)


def export_integer_module(module: torch.nn.Module, example_inputs: tuple, input_names: list[str],
                          output_names: list[str], gemm: str = "auto") -> onnx.ModelProto:
    """Trace an integer model (the lowering's modules, integer inputs) into an integer-only ONNX graph, checked
    with :func:`check_integer_only`. Every registry module exports so: its ``intops`` traced, with the
    integer lowerings above. ``gemm``: "u8u8", "u8s8" or "auto" (the fastest exact one for this CPU)."""
    gemm = onnx_gemm_for_this_cpu() if gemm == "auto" else gemm
    buffer = io.BytesIO()
    with integer_symbolics(), onnx_gemm(gemm), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings on the constant shapes and shifts, which are constants
        torch.onnx.export(module.eval(), tuple(example_inputs), buffer, dynamo=False, opset_version=OPSET,
                          input_names=input_names, output_names=output_names, do_constant_folding=True)
    proto = expand_shifts(onnx.load_from_string(buffer.getvalue()))
    proto.ir_version = IR_VERSION
    props = {GEMM_KEY: gemm}
    if gemm == "u8s8":
        props[REQUIRES_KEY] = U8S8_NEEDS
    onnx.helper.set_model_props(proto, props)
    return check_integer_only(proto)


def export_onnx_int(model: DeployedSegmenter, path: str | Path | None = None, gemm: str = "auto",
                    replace: bool = True) -> onnx.ModelProto:
    """Trace a deployed model into an integer-only ONNX graph (batch 1 of uint8 RGB pixels in; integer
    logits and the class map out), checked with :func:`check_integer_only`; written to ``path`` if given
    (``replace=False``: not over a file another run wrote meanwhile). ``gemm`` as in :func:`export_integer_module`."""
    if not isinstance(model, DeployedSegmenter):
        raise TypeError(f"export_onnx_int takes a DeployedSegmenter (iseg ptq's output, or "
                        f"iseg_plugin.deploy.convert's), got {type(model).__name__}")
    pixels = torch.zeros(1, 3, *model.input_size, dtype=torch.uint8)
    proto = export_integer_module(model, (pixels,), ["pixels"], ["logits", "classes"], gemm)
    if path is not None:
        atomic_write(path, lambda tmp: onnx.save(proto, str(tmp)), replace)
    return proto


def gemm_form(metadata: dict[str, str]) -> str:
    """The GEMM form (an entry of ONNX_GEMMS) recorded in a graph's metadata (files before the record: u8u8)."""
    gemm = metadata.get(GEMM_KEY, "u8u8")
    if gemm not in ONNX_GEMMS:
        raise ValueError(f"unknown GEMM form {gemm!r} in the graph's {GEMM_KEY} metadata; known: {', '.join(ONNX_GEMMS)}")
    return gemm


def has_u8s8_gemms(proto: onnx.ModelProto) -> bool:
    """Whether a MatMulInteger of the graph takes an int8 second operand, read from the graph's types
    (not from its metadata, which a tool may strip)."""
    graph = check_integer_only(proto).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info]}
    types.update({t.name: t.data_type for t in graph.initializer})
    return any(types.get(node.input[1]) == TensorProto.INT8 for node in graph.node if node.op_type == "MatMulInteger")


def onnx_session(model: onnx.ModelProto | str | Path, threads: int | None = None):
    """An onnxruntime CPU session for an integer-only graph of :func:`export_integer_module`; refuses a
    graph whose uint8 x int8 GEMMs this CPU's onnxruntime kernel would not compute exactly."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    if onnx_gemm_for_this_cpu() != "u8s8" and has_u8s8_gemms(
            model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))):  # (read only where it matters)
        raise ValueError(f"this graph's uint8 x int8 GEMMs are exact in onnxruntime only with AVX-512 VNNI, and this "
                         f"CPU has {cpu_isa()}: re-export it here (iseg export --gemm u8u8)")
    return session


def expand_shifts(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Replace each ``ArithmeticShift`` placeholder by exact standard ops on uint64.

    Right: ``(x + 2**63) >> s`` on uint64 is ``floor(x / 2**s) + 2**(63 - s)`` exactly (x + 2**63 is
    x's two's-complement bits with the top bit flipped, an unsigned number in the same order), so
    ``Cast(u64) -> BitwiseXor 2**63 -> BitShift -> Sub 2**(63-s) -> Cast back`` floors like ``>>``;
    the casts and the Sub wrap modulo 2**64. 2-3x faster in onnxruntime than ``Where`` + ``Div``.
    (Xor, not an Add of 2**63: TVM 0.27 imports that Add wrongly.)
    Left: ``Cast(u64) -> BitShift -> Cast back`` (wraps as an int64 ``<<`` does).
    """
    helper, u64 = onnx.helper, TensorProto.UINT64
    nodes = []
    for node in proto.graph.node:
        if node.domain != SHIFT_DOMAIN:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        name, right = node.output[0], attrs["direction"] == b"RIGHT"

        def op(op_type, inputs, suffix, **kw):
            nodes.append(helper.make_node(op_type, inputs, [f"{name}/{suffix}"], **kw))
            return f"{name}/{suffix}"

        def const(value, suffix):
            return op("Constant", [], suffix, value=helper.make_tensor(suffix, u64, [], [value]))

        x = op("Cast", [node.input[0]], "as_u64", to=u64)
        constant = attrs.get("amount")  # a constant shift, or None: the node's second input
        amount = const(constant, "amount") if constant is not None else op("Cast", [node.input[1]], "amount", to=u64)
        if right:
            top = const(_TOP_BIT, "top_bit")
            if constant is not None:
                offset = const(_TOP_BIT >> constant, "offset")
            else:
                offset = op("BitShift", [top, amount], "offset", direction="RIGHT")
            shifted = op("BitShift", [op("BitwiseXor", [x, top], "biased"), amount], "shifted", direction="RIGHT")
            x = op("Sub", [shifted, offset], "unbiased")
        else:
            x = op("BitShift", [x, amount], "shifted", direction="LEFT")
        nodes.append(helper.make_node("Cast", [x], [name], to=attrs["to"]))
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    kept = [o for o in proto.opset_import if o.domain != SHIFT_DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    return proto


def check_integer_only(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Every tensor of the graph (inputs, outputs, initializers, constants, every intermediate with
    its inferred type, every Cast target) is integer or bool; raises :class:`NotIntegerOnlyError`
    naming the first offenders otherwise. Returns the model with inferred types."""
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output, *graph.value_info]}
    types.update({t.name: t.data_type for t in graph.initializer})
    # tensor names carry the exporting module's scope (e.g. /decoder/mask_norm/Sqrt_output_0)
    bad = [f"{name} ({TensorProto.DataType.Name(t)})" for name, t in types.items() if t not in INTEGER_TYPES]
    for node in graph.node:
        for out in node.output:
            if out and out not in types:
                bad.append(f"{out} (no inferred type, from {node.op_type})")
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type not in INTEGER_TYPES:
                bad.append(f"{node.op_type} constant {node.output[0]} ({TensorProto.DataType.Name(attr.t.data_type)})")
            if node.op_type == "Cast" and attr.name == "to" and attr.i not in INTEGER_TYPES:
                bad.append(f"Cast to {TensorProto.DataType.Name(attr.i)} at {node.output[0]}")
    if bad:
        raise NotIntegerOnlyError(f"the graph is not integer-only: {len(bad)} tensors, e.g. {bad[:5]}")
    return inferred

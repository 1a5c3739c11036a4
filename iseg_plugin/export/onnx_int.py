"""Integer-only ONNX: the deployed model's forward, traced, with exact integer lowerings.

The graph is the trace of :class:`~iseg_plugin.deploy.DeployedSegmenter`'s forward (TorchScript
exporter), so it computes the very ``intops`` arithmetic the PyTorch model runs; no operator is
written a second time. What torch's standard ONNX symbolics would get wrong for integers is
lowered here instead (registered only for the duration of the export):

* GEMMs (``torch._int_mm``) become ``MatMulInteger`` on uint8 x int8: the int8 activations enter as
  ``x + 128`` with zero point 128, which MatMulInteger subtracts exactly (onnxruntime's int8 x int8
  kernel is ~30x slower than its u8 x s8 one, ecosystem notes §7);
* arithmetic right shifts and floor divisions become exact ``Div``s (``Div`` truncates toward zero,
  ``BitShift`` is unsigned only; see :func:`_floor_div`); left shifts become multiplications;
* clamps, minimum, maximum and sign become comparisons + ``Where`` (onnxruntime 1.31's int64
  ``Min`` / ``Max`` / ``Clip`` / ``Sign`` kernels are not exact for values beyond 32 bits);
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

from ..deploy.convert import convert
from ..deploy.segmenter import DeployedSegmenter

OPSET = 18
IR_VERSION = 10  # onnxruntime 1.31 reads IR <= 13; onnx 1.23 writes 14 (ecosystem notes B3)
INTEGER_TYPES = {TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16, TensorProto.INT32,
                 TensorProto.UINT32, TensorProto.INT64, TensorProto.UINT64, TensorProto.BOOL}


class NotIntegerOnlyError(ValueError):
    """An ONNX graph holds or computes a non-integer tensor."""


def _dtype(x) -> torch.dtype:
    from torch.onnx._internal.torchscript_exporter._type_utils import JitScalarType

    return JitScalarType.from_value(x, JitScalarType.INT64).dtype()


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
    from torch.onnx._internal.torchscript_exporter._type_utils import JitScalarType

    return g.op("Cast", y, to_i=JitScalarType.from_dtype(_dtype(like)).onnx_type())


def _const_int(value) -> int | None:
    from torch.onnx import symbolic_helper

    v = symbolic_helper._maybe_get_const(value, "i")
    return v if isinstance(v, int) else None


def _pow2(g, shift, like):
    """2**shift as a tensor like ``like``: a constant, or a lookup in the table of 2**0 .. 2**62
    (the exporter has no uint64 for a BitShift, and every shift here is at most 62)."""
    s = _const_int(shift)
    if s is not None:
        return _const(g, 1 << s, like)
    table = g.op("Constant", value_t=torch.tensor([1 << k for k in range(63)], dtype=torch.int64))
    return _cast_like(g, g.op("Gather", table, _cast_like(g, shift, table), axis_i=0), like)


def _floor_div(g, x, d):
    """floor(x / d), exactly (``Div`` truncates toward zero).

    A positive constant divisor (every shift, most divisions): negative ``x`` is moved down by
    ``d - 1`` first, so truncation floors (~1.4x faster in onnxruntime than the general form).
    Otherwise the floored remainder is removed first: ``(x - Mod(x, d)) / d``.
    """
    value = _const_int(d)
    d = _cast_like(g, d, x)
    if value is not None and value > 0:
        moved = g.op("Where", g.op("Less", x, _const(g, 0, x)), g.op("Sub", x, _const(g, value - 1, x)), x)
        return g.op("Div", moved, d)
    return g.op("Div", g.op("Sub", x, g.op("Mod", x, d, fmod_i=0)), d)


def _right_shift(g, x, shift):
    return _floor_div(g, x, _pow2(g, shift, x))


def _left_shift(g, x, shift):
    return g.op("Mul", x, _pow2(g, shift, x))


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


def _bound(g, x, bound, keep_above: bool):
    """max(x, bound) (``keep_above``) or min(x, bound) by comparison; ``bound`` may be None."""
    if bound is None or (hasattr(bound, "node") and bound.node().mustBeNone()):
        return x
    b = _cast_like(g, bound, x)
    return g.op("Where", g.op("Less" if keep_above else "Greater", x, b), b, x)


def _clamp(g, x, lo, hi):
    return _bound(g, _bound(g, x, lo, True), hi, False)


def _clamp_min(g, x, lo):
    return _bound(g, x, lo, True)


def _clamp_max(g, x, hi):
    return _bound(g, x, hi, False)


def _minimum(g, a, b):
    return g.op("Where", g.op("Less", a, b), a, b)


def _maximum(g, a, b):
    return g.op("Where", g.op("Greater", a, b), a, b)


def _sign(g, x):
    one, zero = _const(g, 1, x), _const(g, 0, x)
    minus = g.op("Neg", one)
    return g.op("Where", g.op("Greater", x, zero), one, g.op("Where", g.op("Less", x, zero), minus, zero))


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


def export_onnx_int(model, path: str | Path | None = None, input_size: tuple[int, int] | None = None) -> onnx.ModelProto:
    """Trace a deployed model into an integer-only ONNX graph (batch 1 of uint8 RGB pixels in; INT16
    logits and the class map out), checked with :func:`check_integer_only`; written to ``path`` if given.

    ``model`` is a :class:`DeployedSegmenter`, or a calibrated quantized ``ISegmenter``, deployed
    here for ``input_size`` (an uncalibrated one is refused by the conversion).
    """
    if not isinstance(model, DeployedSegmenter):
        if input_size is None:
            raise TypeError(f"export_onnx_int takes a DeployedSegmenter (iseg ptq's output), or a quantized "
                            f"ISegmenter with input_size=(H, W); got {type(model).__name__}")
        model = convert(model, input_size)
    pixels = torch.zeros(1, 3, *model.input_size, dtype=torch.uint8)
    buffer = io.BytesIO()
    with integer_symbolics(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings on the constant shapes and shifts, which are constants
        torch.onnx.export(model.eval(), (pixels,), buffer, dynamo=False, opset_version=OPSET,
                          input_names=["pixels"], output_names=["logits", "classes"], do_constant_folding=True)
    proto = onnx.load_from_string(buffer.getvalue())
    proto.ir_version = IR_VERSION
    proto = check_integer_only(proto)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        onnx.save(proto, str(path))
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

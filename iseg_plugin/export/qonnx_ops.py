"""qonnx custom ops of the domain ``iseg_plugin.export.qonnx_ops``: the deployed model's integer operators.

qonnx imports an ONNX node's domain as a Python module and runs the class named after its op type
(ecosystem notes §1.5). Each node is fully defined by its integer attributes (multipliers, shifts,
bounds, table parameters; ``docs/qonnx_ops.md`` specifies every op for other tools): the classes here
rebuild the registry's deployed module from those attributes alone and run its forward on the int64
inputs, so qonnx executes the very arithmetic of the PyTorch deployed model (the :mod:`iseg_plugin.intops`
functions, in torch, not a numpy copy of them). Shape inference: every op keeps its first input's shape;
datatype inference: the smallest qonnx ``INTk`` / ``UINTk`` holding the op's output bounds.
"""
from __future__ import annotations

import torch
from onnx import helper
from qonnx.core.datatype import DataType
from qonnx.custom_op.base import CustomOp
from torch import nn

from .. import intops
from ..deploy.io import module_from_spec
from ..ops import modules as M

# The deployed module classes that describe a node (ops/modules.py, ``QONNX``): their attributes and children
_DESCRIBED = {name: cls.QONNX for name, cls in vars(M).items()
              if isinstance(cls, type) and issubclass(cls, nn.Module) and getattr(cls, "QONNX", None) is not None}
_FIELDS = {name: (q.buffers, q.fields) for name, q in _DESCRIBED.items()}  # integer buffers, plain integer fields
_TUPLES = {"bounds", "size"}  # fields that are pairs: (lo, hi), (height, width)
_ENUMS = {"mode": ("nearest", "bilinear")}  # string fields, written as their index

# deployed modules without a node of their own: traced as standard ONNX (GEMMs as MatMul, convolutions as pads,
# slices and MatMul, products, ReduceSum, Concat, the pools' Gather + ReduceSum / ReduceMax), their requantizations
# as DyadicRequant nodes
STANDARD_ONNX = ("Linear", "PatchConv", "Conv2d", "ConvTranspose2d", "MatMul", "Mul", "Mean", "Cat", "AvgPool",
                 "MaxPool")

# op type -> (deployed module class, its children by name); attributes of a child are prefixed "child_".
NODE_TYPES = {q.op_type: (name, dict(q.children)) for name, q in _DESCRIBED.items() if q.op_type}
OP_TYPE_OF = {module: op for op, (module, _) in NODE_TYPES.items()}

__all__ = list(NODE_TYPES)


def _parts(op_type: str):
    """(attribute prefix, class) of the node's module and each child."""
    module, children = NODE_TYPES[op_type]
    return [("", module)] + [(f"{name}_", cls) for name, cls in children.items()]


def attribute_types(op_type: str) -> dict[str, str]:
    """Each attribute of ``op_type`` and its ONNX type: ``ints`` (buffers, bounds) or ``i``."""
    types = {}
    for prefix, cls in _parts(op_type):
        buffers, fields = _FIELDS[cls]
        types.update({prefix + b: "ints" for b in buffers})
        types.update({prefix + f: "ints" if f in _TUPLES else "i" for f in fields})
    return types


def node_attributes(module: nn.Module) -> tuple[str, dict]:
    """The op type and integer attributes of a deployed module (buffers flattened, one value per channel)."""
    op_type = OP_TYPE_OF[type(module).__name__]
    attributes = {}
    for prefix, cls in _parts(op_type):
        part = module if not prefix else module.get_submodule(prefix[:-1])
        buffers, fields = _FIELDS[cls]
        attributes.update({prefix + b: [int(v) for v in getattr(part, b).flatten().tolist()] for b in buffers})
        attributes.update({prefix + f: _encode_field(f, getattr(part, f)) for f in fields})
    if op_type == "IntResize" and module.out is not None:
        raise ValueError("IntResize stands for an upsampling without a requantization of its own")
    return op_type, attributes


def _encode_field(name: str, value):
    if name in _TUPLES:
        return [int(v) for v in value]
    return _ENUMS[name].index(value) if name in _ENUMS else int(value)


def _decode_field(name: str, value):
    if name in _TUPLES:
        return {"tuple": list(value)}
    return _ENUMS[name][int(value)] if name in _ENUMS else int(value)


def module_from_attributes(op_type: str, attributes: dict) -> nn.Module:
    """The deployed module a node stands for, from its attributes alone (a one-value list: a per-tensor constant)."""
    if op_type not in NODE_TYPES:
        raise ValueError(f"unknown {__name__} op {op_type!r}; known: {', '.join(NODE_TYPES)}")
    missing = sorted(set(attribute_types(op_type)) - set(attributes))
    if missing:
        raise ValueError(f"{op_type} node lacks the attributes {missing}")
    state = {}

    def spec(name: str, cls: str, children: dict) -> dict:
        prefix = f"{name}_" if name else ""
        buffers, fields = _FIELDS[cls]
        for b in buffers:
            values = torch.tensor(attributes[prefix + b], dtype=torch.int64)
            state[f"{name}.{b}" if name else b] = values[0] if values.numel() == 1 else values
        attrs = {f: _decode_field(f, attributes[prefix + f]) for f in fields}
        if cls == "Upsample":
            attrs["out"] = None
        return {"type": cls, "attrs": attrs, "buffers": list(buffers), "none_buffers": [],
                "children": {child: spec(child, child_cls, {}) for child, child_cls in children.items()}}

    module, children = NODE_TYPES[op_type]
    return module_from_spec(spec("", module, children), state)


def output_bounds(op_type: str, attributes: dict) -> tuple[int, int]:
    """The integer range of a node's output."""
    if "out_bounds" in attributes:
        return tuple(attributes["out_bounds"])
    if "bounds" in attributes:  # (DyadicRequant, IntClamp)
        return tuple(attributes["bounds"])
    if op_type == "ResidualAdd":
        return intops.int_range(attributes["bits"])
    if op_type == "IntResize":  # values stay within the input's range: the input's datatype
        return None
    return 0, 1 << (attributes["bits"] - 1)  # softmax probabilities


def run_node(op_type: str, attributes: dict, data: list[torch.Tensor]) -> torch.Tensor:
    """A node's output: its deployed module run on the integer inputs. Integer inputs (the integer-only QONNX
    export) give int64; float inputs (the Brevitas export, where a tensor is a float holding integers, QONNX's
    convention) are rounded to the nearest integer first and give the output in that float type."""
    module = module_from_attributes(op_type, attributes)
    floating = data[0].dtype.is_floating_point
    ints = [torch.round(d).to(torch.int64) if d.dtype.is_floating_point else d.to(torch.int64) for d in data]
    with torch.no_grad():
        return module(*ints).to(data[0].dtype if floating else torch.int64)


class _IntegerOp(CustomOp):
    def _op_type(self) -> str:
        return self.onnx_node.op_type

    def get_nodeattr_types(self):
        return {name: (kind, True, [] if kind == "ints" else 0) for name, kind in attribute_types(self._op_type()).items()}

    def _attributes(self) -> dict:
        return {name: self.get_nodeattr(name) for name in attribute_types(self._op_type())}

    def make_shape_compatible_op(self, model):
        node = self.onnx_node  # every one of these operators keeps its first input's shape
        return helper.make_node("Identity", [node.input[0]], [node.output[0]])

    def infer_node_datatype(self, model):
        bounds = output_bounds(self._op_type(), self._attributes())
        if bounds is None:
            model.set_tensor_datatype(self.onnx_node.output[0], model.get_tensor_datatype(self.onnx_node.input[0]))
            return
        lo, hi = bounds
        candidates = [DataType.get_smallest_possible(lo), DataType.get_smallest_possible(hi)]
        if lo < 0:  # (the smallest type of a positive hi may be unsigned)
            candidates = [t if t.signed() else DataType[f"INT{t.bitwidth() + 1}"] for t in candidates]
        model.set_tensor_datatype(self.onnx_node.output[0], max(candidates, key=lambda t: t.bitwidth()))

    def execute_node(self, context, graph):
        node = self.onnx_node
        data = [torch.from_numpy(context[name].copy()) for name in node.input]
        context[node.output[0]] = run_node(self._op_type(), self._attributes(), data).numpy()

    def verify_node(self):
        missing = sorted(set(attribute_types(self._op_type())) - {a.name for a in self.onnx_node.attribute})
        return [f"{self._op_type()}: missing attributes {missing}"] if missing else []


class IntResize(_IntegerOp):
    """Nearest or integer bilinear resize of the last two axes to ``size`` (``Upsample``): its own shape rule."""

    def make_shape_compatible_op(self, model):
        # a standard Resize of the last two axes to ``size`` (its sizes as an initializer, which qonnx's cleanup
        # drops once unused): shape and element type follow the input, whatever is known of it yet
        import numpy as np

        node = self.onnx_node
        sizes = f"{node.output[0]}_iseg_resize_sizes"
        model.set_initializer(sizes, np.array(self.get_nodeattr("size"), dtype=np.int64))
        return helper.make_node("Resize", [node.input[0], "", "", sizes], [node.output[0]], axes=[-2, -1])


# one qonnx CustomOp per op type (qonnx finds it by name in this module), its docstring the description's line
for _op_type, (_module, _) in NODE_TYPES.items():
    if _op_type not in globals():
        globals()[_op_type] = type(_op_type, (_IntegerOp,), {"__doc__": _DESCRIBED[_module].doc,
                                                             "__module__": __name__})


def op_table() -> str:
    """The markdown table of every node type (docs/qonnx_ops.md holds it; a test compares)."""
    rows = ["| op type | deployed module | attributes | output |", "|---|---|---|---|"]
    for op_type, (module, _) in NODE_TYPES.items():
        names = ", ".join(f"`{name}`" for name in attribute_types(op_type))
        rows.append(f"| `{op_type}` | `{module}` | {names} | {_DESCRIBED[module].doc} |")
    return "\n".join(rows)


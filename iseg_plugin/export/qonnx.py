"""QONNX export of the deployed model through Brevitas' ``export_qonnx``, readable by qonnx's tools.

Each integer operator module (requantization, residual add, I-LayerNorm, GELU, softmax, L2 norm) becomes
one node of the domain ``iseg_plugin.export.qonnx_ops`` (an importable module, so qonnx finds its
implementation) defined by its integer attributes alone (``docs/qonnx_ops.md``). The GEMMs are ``MatMul``s
of int8 operands cast to int32 (qonnx datatypes INT8 / UINT16 on their operands, so its inference cost counts
them) and the glue is standard ONNX, lowered as in the integer-only export. The file is IR 10,
opset 18: qonnx's ``cleanup_model``, ``InferShapes``, ``InferDataTypes``, ``inference_cost`` and
``execute_onnx`` read it as it is; :func:`execute_qonnx` runs it with qonnx, bit-exact with PyTorch (tests).
"""
from __future__ import annotations

import ast
import contextlib
import copy
import json
import random
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from .. import kernels
from ..deploy.segmenter import DeployedSegmenter
from ..files import atomic_write
from ..ops.gemm import onnx_gemm
from .onnx_int import IR_VERSION, OPSET, expand_shifts, integer_symbolics
from .qonnx_ops import OP_TYPE_OF, node_attributes, run_node

DOMAIN = "iseg_plugin.export.qonnx_ops"


@torch.library.custom_op("iseg::qonnx_node", mutates_args=())
def _qonnx_node(data: list[torch.Tensor], op_type: str, attributes: str) -> torch.Tensor:
    """One integer operator as one traced op (so the exporter can make it one ONNX node)."""
    return run_node(op_type, json.loads(attributes), data)


def _qonnx_node_symbolic(g, data, op_type, attributes):
    from torch.onnx import symbolic_helper

    inputs = symbolic_helper._unpack_list(data)
    op_type = symbolic_helper._maybe_get_const(op_type, "s")
    values = json.loads(symbolic_helper._maybe_get_const(attributes, "s"))  # ints and lists of ints: "_i"
    out = g.op(f"{DOMAIN}::{op_type}", *inputs, **{f"{name}_i": value for name, value in values.items()})
    out.setType(g.original_node.output().type())  # the traced type: int64, the first input's shape
    return out


class _AsNode(nn.Module):
    def __init__(self, module: nn.Module):
        super().__init__()
        self.op_type, attributes = node_attributes(module)
        self.attributes = json.dumps(attributes)

    def forward(self, *data):
        return _qonnx_node(list(data), self.op_type, self.attributes)


def _called_operators(model: nn.Module, pixels: torch.Tensor) -> set[int]:
    """The integer operator modules a forward calls (some only hold constants for their parent)."""
    called: set[int] = set()
    candidates = [m for m in model.modules() if type(m).__name__ in OP_TYPE_OF]
    hooks = [m.register_forward_pre_hook(lambda m, args: called.add(id(m))) for m in candidates]
    try:
        with torch.no_grad(), kernels.reference():  # (a fused kernel would hide the operators it fuses)
            model(pixels)
    finally:
        for h in hooks:
            h.remove()
    return called


def _as_nodes(module: nn.Module, called: set[int]) -> None:
    """Replace every called integer operator module below ``module`` (outermost first) by its node."""
    for name, child in module.named_children():
        if id(child) in called:
            setattr(module, name, _AsNode(child))
        else:
            _as_nodes(child, called)


def export_qonnx(model: DeployedSegmenter, path: str | Path, replace: bool = True) -> onnx.ModelProto:
    """Export ``model`` (batch 1, uint8 RGB pixels in) to QONNX with Brevitas' exporter (TorchScript);
    ``replace=False``: refuse to replace a ``path`` another run wrote meanwhile (:func:`iseg_plugin.files.write_together`)."""
    from brevitas.export import export_qonnx as brevitas_export_qonnx

    if not isinstance(model, DeployedSegmenter):
        raise TypeError(f"export_qonnx takes a DeployedSegmenter (iseg ptq's output), got {type(model).__name__}")
    graph_model = copy.deepcopy(model).eval()
    pixels = torch.zeros(1, 3, *model.input_size, dtype=torch.uint8)
    _as_nodes(graph_model, _called_operators(graph_model, pixels))
    exported = []

    def write(tmp: Path) -> None:
        torch.onnx.register_custom_op_symbolic("iseg::qonnx_node", _qonnx_node_symbolic, OPSET)
        try:
            # (the reference path: a fused kernel would hide the operators it fuses, which are the nodes)
            with integer_symbolics(), onnx_gemm("i32"), warnings.catch_warnings(), kernels.reference():
                warnings.simplefilter("ignore")
                brevitas_export_qonnx(graph_model, (pixels,), export_path=str(tmp), dynamo=False, opset_version=OPSET,
                                      do_constant_folding=True, keep_initializers_as_inputs=False,
                                      input_names=["pixels"], output_names=["logits", "classes"])
        finally:
            torch.onnx.unregister_custom_op_symbolic("iseg::qonnx_node", OPSET)
        with _seeded_random():  # qonnx names new tensors with random strings: the same model gives the same file
            wrapper = _annotate_gemm_operands(static_shapes(expand_shifts(onnx.load(str(tmp)))))
        wrapper.model.ir_version = IR_VERSION
        wrapper.save(str(tmp))
        exported.append(wrapper.model)

    atomic_write(path, write, replace)
    return exported[0]


@contextlib.contextmanager
def _seeded_random(seed: int = 0):
    """Python's ``random`` seeded inside the block, its state restored after (the caller's draws are untouched)."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def static_shapes(proto: onnx.ModelProto):
    """qonnx's shape inference, then constant folding (:func:`_fold_constants`) until nothing changes: folded
    shapes give static shapes downstream, whose ``Shape`` nodes fold in turn (qonnx needs every shape)."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.infer_shapes import InferShapes

    wrapper = ModelWrapper(proto).transform(InferShapes())
    while True:
        count = len(wrapper.graph.node)
        wrapper = ModelWrapper(_fold_constants(wrapper)).transform(InferShapes())
        if len(wrapper.graph.node) == count:
            return wrapper


def _fold_constants(wrapper) -> onnx.ModelProto:
    """Evaluate every standard node whose inputs are constants (``Shape`` of a tensor of known shape included)
    into an initializer, in one pass in graph order. The TorchScript exporter leaves the shape arithmetic of
    the integer modules' traces unfolded around custom nodes; qonnx's own ``FoldConstants`` (in its cleanup)
    folds one node per pass and re-infers every shape in between: minutes on a ViT. onnx's reference
    evaluator computes these small integer tensors exactly."""
    import numpy as np
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    proto = wrapper.model
    graph = proto.graph
    known = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    kept, folded = [], []
    for node in graph.node:
        inputs = [i for i in node.input if i]
        shape = wrapper.get_tensor_shape(inputs[0]) if node.op_type == "Shape" and not node.domain else None
        if shape and not node.attribute and all(isinstance(d, int) and d > 0 for d in shape):  # a static shape
            known[node.output[0]] = np.array(shape, dtype=np.int64)
            folded.append(node.output[0])
            continue
        if node.domain or not all(i in known for i in inputs):
            kept.append(node)
            continue
        one = helper.make_graph([node], "fold", [helper.make_tensor_value_info(i, 0, None) for i in inputs],
                                [helper.make_tensor_value_info(o, 0, None) for o in node.output])
        values = ReferenceEvaluator(helper.make_model(one, opset_imports=proto.opset_import)).run(
            None, {i: known[i] for i in inputs})
        for name, value in zip(node.output, values):
            known[name] = np.asarray(value)
            folded.append(name)
    used = {i for n in kept for i in n.input} | {o.name for o in graph.output}
    initializers = [t for t in graph.initializer if t.name in used]
    have = {t.name for t in initializers}
    initializers += [numpy_helper.from_array(known[n], n) for n in folded if n in used and n not in have]
    del graph.node[:]
    graph.node.extend(kept)
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    stale = [v for v in graph.value_info if v.name in known]  # (a folded tensor's shape is its initializer's)
    for v in stale:
        graph.value_info.remove(v)
    return proto


def _annotate_gemm_operands(wrapper):
    """qonnx datatypes of the MatMuls' operands (INT8 weights and activations, UINT16 probabilities), which
    its datatype inference cannot see through the int32 Casts: qonnx's inference cost counts their bit
    operations from these (it keeps a datatype set on a tensor its rules do not cover)."""
    from qonnx.core.datatype import DataType
    from qonnx.transformation.infer_datatypes import InferDataTypes

    wrapper = wrapper.transform(InferDataTypes())  # the custom nodes' output datatypes
    for node in wrapper.graph.node:
        if node.op_type != "MatMul":
            continue
        for name in node.input:
            values = wrapper.get_initializer(name)
            if values is not None:
                lo, hi = int(values.min()), int(values.max())
                wrapper.set_tensor_datatype(name, DataType["INT8"] if -128 <= lo and hi <= 127 else DataType["INT32"])
                continue
            producer = wrapper.find_producer(name)
            while producer is not None and producer.op_type == "Cast":  # back through the Casts that widen it
                source = producer.input[0]
                if wrapper.get_tensor_valueinfo(source).type.tensor_type.elem_type == onnx.TensorProto.INT8:
                    wrapper.set_tensor_datatype(name, DataType["INT8"])
                    break
                if wrapper.get_tensor_datatype(source).is_integer():
                    wrapper.set_tensor_datatype(name, wrapper.get_tensor_datatype(source))
                    break
                producer = wrapper.find_producer(source)
    return wrapper


def qonnx_inference_cost(path: str | Path) -> dict:
    """qonnx's own first steps and cost report on an exported file: ``cleanup_model``, ``InferShapes``,
    ``InferDataTypes``, then ``inference_cost`` (MACs and bit operations by operand datatypes, weight and
    output memory; the ops it has no cost rule for are listed as "unsupported")."""
    import tempfile

    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.transformation.infer_shapes import InferShapes
    from qonnx.util.cleanup import cleanup_model
    from qonnx.util.inference_cost import inference_cost

    model = cleanup_model(ModelWrapper(str(path))).transform(InferShapes()).transform(InferDataTypes())
    with tempfile.TemporaryDirectory() as tmp:
        model.save(f"{tmp}/clean.onnx")
        cost = inference_cost(f"{tmp}/clean.onnx", output_json=None, discount_sparsity=False)["total_cost"]
    unsupported = cost.get("unsupported", set())  # qonnx 1.0 gives the set as its string
    cost["unsupported"] = sorted(ast.literal_eval(unsupported) if isinstance(unsupported, str) else unsupported)
    return cost


def execute_qonnx(path_or_model, pixels) -> dict:
    """Run a QONNX file with ``qonnx.core.onnx_exec.execute_onnx``; returns its outputs by name."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx

    model = ModelWrapper(path_or_model if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model))
    return execute_onnx(model, {"pixels": pixels})

"""QONNX export of the deployed model through Brevitas' ``export_qonnx``, executable by qonnx.

Each integer operator module (requantization, residual add, I-LayerNorm, GELU, softmax) becomes
one node of the domain ``iseg_plugin.export.qonnx_ops`` (an importable module, so qonnx finds its
implementation) with its integer constants as initializers and its structure as a ``spec``
attribute. The GEMMs are ``MatMulInteger`` and the glue is standard ONNX, lowered as in the
integer-only export. :func:`execute_qonnx` runs the graph with qonnx: bit-exact with PyTorch (tests).
"""
from __future__ import annotations

import contextlib
import copy
import json
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from .. import kernels
from ..deploy.io import module_spec
from ..deploy.segmenter import DeployedSegmenter
from ..files import atomic_write
from .onnx_int import IR_VERSION, OPSET, expand_shifts, integer_symbolics
from .qonnx_ops import __all__ as NODE_TYPES
from .qonnx_ops import run_module

DOMAIN = "iseg_plugin.export.qonnx_ops"


@torch.library.custom_op("iseg::deployed_module", mutates_args=())
def _deployed_module(data: list[torch.Tensor], state: list[torch.Tensor], spec: str) -> torch.Tensor:
    """One deployed module as one traced op (so the exporter can make it one ONNX node)."""
    return run_module(spec, data, state)


def _deployed_module_symbolic(g, data, state, spec):
    from torch.onnx import symbolic_helper

    inputs, buffers = symbolic_helper._unpack_list(data), symbolic_helper._unpack_list(state)
    spec = symbolic_helper._maybe_get_const(spec, "s")
    out = g.op(f"{DOMAIN}::{json.loads(spec)['tree']['type']}", *inputs, *buffers, spec_s=spec, n_data_i=len(inputs))
    out.setType(inputs[0].type().with_dtype(torch.int64))  # run_module returns int64, the first input's shape
    return out


class _AsNode(nn.Module):
    def __init__(self, module: nn.Module):
        super().__init__()
        state = module.state_dict()
        self.spec = json.dumps({"tree": module_spec(module), "buffers": list(state)})
        for i, tensor in enumerate(state.values()):  # buffers, so the exporter makes them initializers
            self.register_buffer(f"state{i}", tensor)

    def forward(self, *data):
        return _deployed_module(list(data), list(self.buffers()), self.spec)


def _called_operators(model: nn.Module, pixels: torch.Tensor) -> set[int]:
    """The integer operator modules a forward calls (some only hold constants for their parent)."""
    called: set[int] = set()
    candidates = [m for m in model.modules() if type(m).__name__ in NODE_TYPES]
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


def export_qonnx(model: DeployedSegmenter, path: str | Path) -> onnx.ModelProto:
    """Export ``model`` (batch 1, uint8 RGB pixels in) to QONNX with Brevitas' exporter (TorchScript)."""
    from brevitas.export import export_qonnx as brevitas_export_qonnx

    if not isinstance(model, DeployedSegmenter):
        raise TypeError(f"export_qonnx takes a DeployedSegmenter (iseg ptq's output), got {type(model).__name__}")
    graph_model = copy.deepcopy(model).eval()
    pixels = torch.zeros(1, 3, *model.input_size, dtype=torch.uint8)
    _as_nodes(graph_model, _called_operators(graph_model, pixels))
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.infer_shapes import InferShapes

    exported = []

    def write(tmp: Path) -> None:
        torch.onnx.register_custom_op_symbolic("iseg::deployed_module", _deployed_module_symbolic, OPSET)
        try:
            # (the reference path: a fused kernel would hide the operators it fuses, which are the nodes)
            with integer_symbolics(), warnings.catch_warnings(), kernels.reference():
                warnings.simplefilter("ignore")
                brevitas_export_qonnx(graph_model, (pixels,), export_path=str(tmp), dynamo=False, opset_version=OPSET,
                                      input_names=["pixels"], output_names=["logits", "classes"])
        finally:
            torch.onnx.unregister_custom_op_symbolic("iseg::deployed_module", OPSET)
        wrapper = ModelWrapper(expand_shifts(onnx.load(str(tmp)))).transform(InferShapes())  # qonnx needs every shape
        wrapper.model.ir_version = IR_VERSION
        wrapper.save(str(tmp))
        exported.append(wrapper.model)

    atomic_write(path, write)
    return exported[0]


@contextlib.contextmanager
def _ir_version_for_onnxruntime():
    """qonnx runs each standard node as a one-node onnxruntime model made with onnx's current IR
    version (14), which onnxruntime 1.31 refuses; make those models IR 10 (ecosystem notes B3)."""
    from qonnx.core import onnx_exec

    original = onnx_exec.qonnx_make_model

    def make_model(*args, **kwargs):
        made = original(*args, **kwargs)
        made.ir_version = IR_VERSION
        return made

    onnx_exec.qonnx_make_model = make_model
    try:
        yield
    finally:
        onnx_exec.qonnx_make_model = original


def execute_qonnx(path_or_model, pixels) -> dict:
    """Run a QONNX file with ``qonnx.core.onnx_exec.execute_onnx``; returns its outputs by name."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx

    model = ModelWrapper(path_or_model if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model))
    with _ir_version_for_onnxruntime():
        return execute_onnx(model, {"pixels": pixels})

"""QONNX export of models built from the plugin's Brevitas layers, through Brevitas' own QONNX manager.

:class:`IsegQONNXManager` is Brevitas' ``QONNXManager`` with one export handler per plugin layer of
:mod:`iseg_plugin.nn`; Brevitas' own handlers write its quantizers and GEMMs as it always does
(``QuantIdentity`` / weights / ``Int32Bias`` -> ``Quant`` nodes, ``QuantLinear`` -> ``Gemm`` / ``MatMul``
on their float outputs). Tensors follow QONNX's convention: floats holding integers times a scale.

* A requantization that stands alone (``DyadicRequant``, the one after ``QuantMatMul``'s product) is a
  standard ``Quant`` node (``round(x / S_out)``, clamped, in the graph's float type), with the integer
  ``multiplier`` and ``shift`` of the plugin's arithmetic recorded on the node as attributes.
* Each integer non-linear operator (I-LayerNorm, the GELUs, the softmaxes, the residual add) is one node of
  the domain ``iseg_plugin.export.qonnx_ops`` defined by integer attributes alone (``docs/qonnx_ops.md``; its
  fused output requantization is part of that definition), fed its integers by a ``Div`` by the input scale
  and followed by a ``Mul`` by the output scale.

Agreement with the PyTorch model: the custom nodes are exact; a ``Quant`` node computes the requantization in
float (float32 in a float32 model), not with the multiplier and shift, so it can differ by one where the
product is not exact in that float or lies within 2**-31 of a rounding tie (measured: tests, closing notes).
"""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from brevitas.export.manager import _set_export_handler
from brevitas.export.onnx.handler import ONNXBaseHandler
from brevitas.export.onnx.qonnx.manager import QONNXManager
from brevitas.quant_tensor import IntQuantTensor, QuantTensor
from torch import Tensor

from ..files import atomic_write
from ..nn import layers as L
from .onnx_int import IR_VERSION, OPSET
from .qonnx import _fold_constants, _qonnx_node, _qonnx_node_symbolic
from .qonnx_ops import node_attributes

BREVITAS_DOMAIN = "onnx.brevitas"  # Brevitas' name for the QONNX domain of Quant / Trunc (qonnx reads it)


class RequantQuantFn(torch.autograd.Function):
    """A requantization as a QONNX ``Quant`` node, its integer multiplier and shift as extra attributes."""

    @staticmethod
    def symbolic(g, x, scale, zero_point, bit_width, signed, multiplier, shift):
        out = g.op(f"{BREVITAS_DOMAIN}::Quant", x, scale, zero_point, bit_width, rounding_mode_s="ROUND",
                   signed_i=int(signed), narrow_i=0, multiplier_i=multiplier, shift_i=shift)
        out.setType(x.type())
        return out

    @staticmethod
    def forward(ctx, x, scale, zero_point, bit_width, signed, multiplier, shift):
        bits = int(bit_width)
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        return torch.clamp(torch.round(x / scale), lo, hi) * scale


def _value(x) -> Tensor:
    return x.value if isinstance(x, QuantTensor) else x


def _integers(x: IntQuantTensor) -> Tensor:
    """The integers of ``x`` as the graph computes them: a ``Div`` by its (constant) scale."""
    return _value(x) / x.scale


def _requant(x: Tensor, requant, grid) -> IntQuantTensor:
    """A plugin requantization (``ops.modules.Requant``) of the float ``x`` onto ``grid`` as a ``Quant`` node."""
    bits, signed = int(grid.bit_width), bool(grid.signed)
    expected = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if tuple(requant.bounds) != expected:
        raise ValueError(f"a Quant node clamps to {expected}; this requantization clamps to {tuple(requant.bounds)}")
    scale = grid.scale.detach().to(x.dtype)
    zero = torch.zeros((), dtype=x.dtype)
    out = RequantQuantFn.apply(x, scale, zero, torch.tensor(float(bits), dtype=x.dtype), signed,
                               [int(v) for v in requant.multiplier.flatten()], [int(v) for v in requant.shift.flatten()])
    return IntQuantTensor(out, scale, zero, grid.bit_width, signed, False)


def _custom_node(module, inputs: list[Tensor]) -> Tensor:
    """The deployed ``module`` as one node of the plugin's QONNX domain, on float tensors holding integers."""
    op_type, attributes = node_attributes(module)
    return _qonnx_node(inputs, op_type, json.dumps(attributes))


class _LayerHandler(ONNXBaseHandler):
    """Reads what the layer's last eval forward ran (its deployed module and output grid)."""

    handled_layer = ()

    def prepare_for_export(self, module):
        if module.export_record is None:
            raise RuntimeError(f"{type(module).__name__} has not run on integers: calibrate the model and put it "
                               "in eval mode before exporting")
        self.deployed, self.grid = module.export_record

    def _out(self, integers: Tensor) -> IntQuantTensor:
        scale = self.grid.scale.detach().to(integers.dtype)
        return IntQuantTensor(integers * scale, scale, torch.zeros_like(scale), self.grid.bit_width,
                              self.grid.signed, False)


class DyadicRequantHandler(_LayerHandler):
    handled_layer = L.DyadicRequant

    def symbolic_execution(self, x):
        return _requant(_value(x), self.deployed, self.grid)


class CustomNodeHandler(_LayerHandler):
    """I-LayerNorm, GELU, softmax: one custom node on the input's integers, times the output scale."""

    handled_layer = (L.QuantILayerNorm, L.QuantGELU, L.QuantSoftmax)

    def symbolic_execution(self, x):
        return self._out(_custom_node(self.deployed, [_integers(x)]))


class ResidualAddHandler(_LayerHandler):
    handled_layer = L.QuantResidualAdd

    def symbolic_execution(self, a, b):
        return self._out(_custom_node(self.deployed, [_integers(a), _integers(b)]))


class MatMulHandler(_LayerHandler):
    """The product as a float ``MatMul`` of the two quantized operands (as Brevitas writes its GEMMs), then
    the requantization as a ``Quant`` node."""

    handled_layer = L.QuantMatMul

    def symbolic_execution(self, a, b):
        return _requant(torch.matmul(_value(a), _value(b)), self.deployed.out, self.grid)


class ScalarMulHandler(_LayerHandler):
    handled_layer = L.QuantScalarMul

    def prepare_for_export(self, module):
        self.multiplier = module.multiplier

    def symbolic_execution(self, x, factor=None):
        c = self.multiplier(factor)
        return IntQuantTensor(_value(x) * c, x.scale * c, x.zero_point, x.bit_width, x.signed, False)


class UpsampleHandler(_LayerHandler):
    """Nearest: a standard ``Resize`` (it moves values only). Integer bilinear has no QONNX node yet."""

    handled_layer = L.QuantUpsample

    def symbolic_execution(self, x):
        if self.deployed.mode != "nearest":
            raise NotImplementedError("integer bilinear upsampling has no QONNX node yet; export the deployed model "
                                      "with `iseg export --format qonnx` instead")
        out = F.interpolate(_value(x), tuple(self.deployed.size), mode="nearest")
        return IntQuantTensor(out, x.scale, x.zero_point, x.bit_width, x.signed, False)


class _FloatOutputs(torch.nn.Module):
    """The model with its ``IntQuantTensor`` outputs as their values (floats on their grids: the graph's outputs;
    the tracer takes tensors only)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args):
        out = self.model(*args)
        return tuple(_value(o) for o in out) if isinstance(out, (tuple, list)) and not isinstance(out, QuantTensor) \
            else _value(out)


class IsegQONNXManager(QONNXManager):
    """Brevitas' QONNX manager, with a handler for each layer of :mod:`iseg_plugin.nn`."""

    handlers = QONNXManager.handlers + [DyadicRequantHandler, CustomNodeHandler, ResidualAddHandler, MatMulHandler,
                                        ScalarMulHandler, UpsampleHandler]

    @classmethod
    def set_export_mode(cls, model, enabled: bool):
        super().set_export_mode(model, enabled)
        for m in model.modules():
            if isinstance(m, L._Layer):
                m.export_mode = enabled

    @classmethod
    def set_export_handler(cls, module):
        super().set_export_handler(module)
        _set_export_handler(cls, module, L._Layer, no_inheritance=False)


def export_brevitas_qonnx(model: torch.nn.Module, args: tuple, path: str | Path, input_names=None,
                          output_names=None) -> onnx.ModelProto:
    """Export a calibrated model of Brevitas layers (the plugin's and Brevitas' own) to QONNX at ``path`` with
    :class:`IsegQONNXManager` (TorchScript exporter), in float32 (a float64 model is exported as its float32
    copy: qonnx computes ``Quant`` nodes in float32). The file is IR 10, opset 18, its shapes inferred and
    folded: qonnx's tools read it as it is. Written atomically (a failed export leaves no half file)."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.infer_shapes import InferShapes

    # qonnx computes Quant nodes in float32: the graph is float32 whatever the model's float type
    model = copy.deepcopy(model).float().eval()
    args = tuple(a.float() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)
    exported = []

    def write(tmp: Path) -> None:
        torch.onnx.register_custom_op_symbolic("iseg::qonnx_node", _qonnx_node_symbolic, OPSET)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                IsegQONNXManager.export(_FloatOutputs(model), args, export_path=str(tmp), opset_version=OPSET, dynamo=False,
                                        do_constant_folding=True, keep_initializers_as_inputs=False,
                                        input_names=input_names, output_names=output_names)
        finally:
            torch.onnx.unregister_custom_op_symbolic("iseg::qonnx_node", OPSET)
        wrapper = ModelWrapper(onnx.load(str(tmp))).transform(InferShapes())
        while True:  # shapes of the custom nodes' neighbours fold in turn
            count = len(wrapper.graph.node)
            wrapper = ModelWrapper(_fold_constants(wrapper)).transform(InferShapes())
            if len(wrapper.graph.node) == count:
                break
        wrapper.model.ir_version = IR_VERSION
        wrapper.save(str(tmp))
        exported.append(wrapper.model)

    atomic_write(path, write)
    return exported[0]


__all__ = ["IsegQONNXManager", "export_brevitas_qonnx"]

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
from brevitas.export.manager import _set_export_handler
from brevitas.export.onnx.handler import ONNXBaseHandler
from brevitas.export.onnx.qonnx.manager import QONNXManager
from brevitas.quant_tensor import IntQuantTensor, QuantTensor
from torch import Tensor

from .. import intops
from ..files import atomic_write
from ..nn import layers as L
from ..nn.layers import _value
from ..ops.entries import reduced_count
from .onnx_int import IR_VERSION, OPSET
from .qonnx import _qonnx_node, _qonnx_node_symbolic, static_shapes
from .qonnx_ops import OP_TYPE_OF, node_attributes

BREVITAS_DOMAIN = "onnx.brevitas"  # Brevitas' name for the QONNX domain of Quant / Trunc (qonnx reads it)


class RequantQuantFn(torch.autograd.Function):
    """A QONNX ``Quant`` node: a requantization, its integer multiplier and shift as extra attributes, or (both
    None) the grid of a tensor that is already on it (so that qonnx infers its ``SCALEDINT`` datatype)."""

    @staticmethod
    def symbolic(g, x, scale, zero_point, bit_width, signed, multiplier, shift):
        dyadic = {} if multiplier is None else dict(multiplier_i=multiplier, shift_i=shift)
        out = g.op(f"{BREVITAS_DOMAIN}::Quant", x, scale, zero_point, bit_width, rounding_mode_s="ROUND",
                   signed_i=int(signed), narrow_i=0, **dyadic)
        out.setType(x.type())
        return out

    @staticmethod
    def forward(ctx, x, scale, zero_point, bit_width, signed, multiplier, shift):
        return intops.quantize(x, scale, intops.int_range(int(bit_width), signed=signed)) * scale


def _integers(x: IntQuantTensor) -> Tensor:
    """The integers of ``x`` as the graph computes them: a ``Div`` by its (constant) scale."""
    return _value(x) / x.scale


def _requant(x: Tensor, requant, grid) -> IntQuantTensor:
    """A plugin requantization (``ops.modules.Requant``) of the float ``x`` onto ``grid`` as a ``Quant`` node."""
    bits, signed = int(grid.bit_width), bool(grid.signed)
    expected = intops.int_range(bits, signed=signed)
    if tuple(requant.bounds) != expected:
        raise ValueError(f"a Quant node clamps to {expected}; this requantization clamps to {tuple(requant.bounds)}")
    scale = grid.scale.detach().to(x.dtype)
    zero = torch.zeros((), dtype=x.dtype)
    out = RequantQuantFn.apply(x, scale, zero, torch.tensor(float(bits), dtype=x.dtype), signed,
                               [int(v) for v in requant.multiplier.flatten()], [int(v) for v in requant.shift.flatten()])
    return IntQuantTensor(out, scale, zero, grid.bit_width, signed, False)


def _on_grid(integers: Tensor, scale: Tensor, bit_width: Tensor, signed) -> IntQuantTensor:
    scale = scale.to(integers.dtype)
    zero = torch.zeros((), dtype=integers.dtype)
    bits = torch.tensor(float(bit_width), dtype=integers.dtype)
    value = RequantQuantFn.apply(integers * scale, scale, zero, bits, bool(signed), None, None)
    return IntQuantTensor(value, scale, zero, bit_width, bool(signed), False)


def _custom_node(module, inputs: list[Tensor]) -> Tensor:
    """The deployed ``module`` as one node of the plugin's QONNX domain, on float tensors holding integers; a module
    without a node of its own (a pool) traced as standard ONNX ops on them."""
    if type(module).__name__ not in OP_TYPE_OF:
        return module(*inputs)
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
        """The integers at the output scale (a ``Mul``), marked as on their grid by a ``Quant`` node."""
        return _on_grid(integers, self.grid.scale.detach(), self.grid.bit_width, self.grid.signed)


class DyadicRequantHandler(_LayerHandler):
    handled_layer = L.DyadicRequant

    def symbolic_execution(self, x):
        return _requant(_value(x), self.deployed, self.grid)


class CustomNodeHandler(_LayerHandler):
    """I-LayerNorm, GELU, softmax, L2 norm and the registry's generic requantized ops (sigmoid, SiLU, ...): one custom
    node on the input's integers (a pool: its standard ops), times the output scale."""

    handled_layer = (L.QuantILayerNorm, L.QuantGELU, L.QuantSoftmax, L.QuantL2Norm, L.QuantRequantizedOp)

    def symbolic_execution(self, x):
        return self._out(_custom_node(self.deployed, [_integers(x)]))


class ResidualAddHandler(_LayerHandler):
    """One custom node; a constant operand (a position embedding) enters as its integers (an initializer)."""

    handled_layer = L.QuantResidualAdd

    def prepare_for_export(self, module):
        super().prepare_for_export(module)
        self.operand = module._operand

    def _integers(self, x) -> Tensor:
        return _integers(x) if isinstance(x, QuantTensor) else self.operand(x)[0]

    def symbolic_execution(self, a, b):
        return self._out(_custom_node(self.deployed, [self._integers(a), self._integers(b)]))


class MeanHandler(_LayerHandler):
    """The mean of the values (``ReduceSum``, ``Mul`` by 1/n), then the requantization as a ``Quant`` node."""

    handled_layer = L.QuantMean

    def symbolic_execution(self, x):
        m = self.deployed
        count = reduced_count(_value(x).shape, m.dim)
        return _requant(_value(x).sum(m.dim, keepdim=m.keepdim) * (1.0 / count), m.out, self.grid)


class CatHandler(_LayerHandler):
    """Each part requantized to the output grid (a ``Quant`` node) where it is not on it, constants quantized to
    it (folded to an initializer), then a ``Concat``."""

    handled_layer = L.QuantCat

    def symbolic_execution(self, *parts):
        values = []
        scale = self.grid.scale.detach()
        for part, requant in zip(parts, self.deployed.requants):
            if not isinstance(part, QuantTensor):  # a constant
                values.append(intops.quantize_constant(part, self.grid.bounds, scale)[0] * scale.to(part.dtype))
            elif isinstance(requant, torch.nn.Identity):
                values.append(_value(part))
            else:
                values.append(_requant(_value(part), requant, self.grid).value)
        return self._out(torch.cat(values, self.deployed.dim) / scale.to(values[0].dtype))


class MatMulHandler(_LayerHandler):
    """The product as a float ``MatMul`` (``Mul`` for ``QuantMul``) of the two quantized operands (as Brevitas writes
    its GEMMs), then the requantization as a ``Quant`` node."""

    handled_layer = (L.QuantMatMul, L.QuantMul)

    def prepare_for_export(self, module):
        super().prepare_for_export(module)
        self.product = torch.mul if isinstance(module, L.QuantMul) else torch.matmul

    def symbolic_execution(self, a, b):
        return _requant(self.product(_value(a), _value(b)), self.deployed.out, self.grid)


class ScalarMulHandler(_LayerHandler):
    handled_layer = L.QuantScalarMul

    def prepare_for_export(self, module):
        self.multiplier = module.multiplier

    def symbolic_execution(self, x, factor=None):
        c = self.multiplier(factor)
        return IntQuantTensor(_value(x) * c, x.scale * c, x.zero_point, x.bit_width, x.signed, False)


class OnInputGridHandler(_LayerHandler):
    """One custom node on the integers whose output stays on the input's grid (``IntResize``: nearest or integer
    bilinear; the generic layer of such registry entries, e.g. ``IntClamp``); the scale is the input's."""

    handled_layer = (L.QuantUpsample, L.QuantRegistryOp)

    def symbolic_execution(self, x, size=None):
        return _on_grid(_custom_node(self.deployed, [_integers(x)]), x.scale, x.bit_width, x.signed)


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
                                        MeanHandler, CatHandler, ScalarMulHandler, OnInputGridHandler]

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
        proto = onnx.load(str(tmp))
        # the exporter leaves the custom nodes' outputs with unknown or zero dims, and the shape arithmetic after them
        # unfolded: infer every shape again from the (static) input's
        del proto.graph.value_info[:]
        wrapper = static_shapes(proto)
        wrapper.model.ir_version = IR_VERSION
        wrapper.save(str(tmp))
        exported.append(wrapper.model)

    atomic_write(path, write)
    return exported[0]


__all__ = ["IsegQONNXManager", "export_brevitas_qonnx"]

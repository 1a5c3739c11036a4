"""qonnx custom ops of the domain ``iseg_plugin.export.qonnx_ops``: the deployed model's integer operators.

qonnx imports an ONNX node's domain as a Python module and runs the class named after its op type
(ecosystem notes §1.5). Each class here (a shape-keeping registry module) rebuilds the deployed module its node stands for from the
node's ``spec`` attribute (the plain-data record of :func:`iseg_plugin.deploy.io.module_spec`) and
its integer inputs (``n_data`` data tensors, then the module's buffers), and runs that module's
forward: qonnx executes the very arithmetic of the PyTorch deployed model, not a copy of it.
"""
from __future__ import annotations

import json

import torch
from onnx import helper
from qonnx.custom_op.base import CustomOp

from ..deploy.io import module_from_spec

__all__ = ["Requant", "Add", "LayerNorm", "ShiftGELU", "LambdaShiftGELU", "PolyGELU", "Shiftmax", "BitExpSoftmax",
           "L2Norm"]


def run_module(spec_json: str, data: list[torch.Tensor], state: list[torch.Tensor]) -> torch.Tensor:
    """The deployed module recorded in ``spec_json``, rebuilt with ``state`` as its buffers, applied to ``data``."""
    spec = json.loads(spec_json)
    module = module_from_spec(spec["tree"], dict(zip(spec["buffers"], state)))
    with torch.no_grad():
        return module(*data).to(torch.int64)  # the node's declared type (modules store narrower integers)


class _DeployedModuleOp(CustomOp):
    def get_nodeattr_types(self):
        return {"spec": ("s", True, ""), "n_data": ("i", True, 1)}

    def make_shape_compatible_op(self, model):
        node = self.onnx_node  # every one of these operators keeps its first input's shape
        return helper.make_node("Identity", [node.input[0]], [node.output[0]])

    def infer_node_datatype(self, model):
        node = self.onnx_node
        model.set_tensor_datatype(node.output[0], model.get_tensor_datatype(node.input[0]))

    def execute_node(self, context, graph):
        node = self.onnx_node
        tensors = [torch.from_numpy(context[name].copy()) for name in node.input]
        n = self.get_nodeattr("n_data")
        context[node.output[0]] = run_module(self.get_nodeattr("spec"), tensors[:n], tensors[n:]).numpy()

    def verify_node(self):
        return []


class Requant(_DeployedModuleOp):
    """Dyadic requantization (``iseg_plugin.ops.modules.Requant``)."""


class Add(_DeployedModuleOp):
    """Residual add of two requantized operands."""


class LayerNorm(_DeployedModuleOp):
    """I-LayerNorm fused with its output requantization."""


class ShiftGELU(_DeployedModuleOp):
    """ShiftGELU (I-ViT), requantized."""


class LambdaShiftGELU(_DeployedModuleOp):
    """lambda-ShiftGELU (I-Segmenter), requantized."""


class PolyGELU(_DeployedModuleOp):
    """Poly-GELU (IPTQ-ViT), requantized."""


class Shiftmax(_DeployedModuleOp):
    """Shiftmax (I-ViT)."""


class BitExpSoftmax(_DeployedModuleOp):
    """Bit-exp softmax (IPTQ-ViT)."""


class L2Norm(_DeployedModuleOp):
    """Integer L2 normalisation over the last dimension, requantized."""

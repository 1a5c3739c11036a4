"""Exporters of the deployed model: integer-only ONNX (onnxruntime, TVM) and QONNX (qonnx)."""
from .onnx_int import NotIntegerOnlyError, check_integer_only, export_integer_module, export_onnx_int, onnx_session
from .qonnx import execute_qonnx, export_qonnx, qonnx_inference_cost
from .tvm import TvmMissingError, TvmModel

__all__ = ["NotIntegerOnlyError", "TvmMissingError", "TvmModel", "check_integer_only", "export_integer_module",
           "export_onnx_int", "execute_qonnx", "export_qonnx", "onnx_session", "qonnx_inference_cost"]

"""Exporters of the deployed model: integer-only ONNX (onnxruntime, TVM)."""
from .onnx_int import NotIntegerOnlyError, check_integer_only, export_onnx_int

__all__ = ["NotIntegerOnlyError", "check_integer_only", "export_onnx_int"]

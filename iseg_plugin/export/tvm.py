"""TVM (Relax) back end for the integer-only ONNX graph: the optional extra ``iseg-plugin[tvm]``.

The graph of :func:`~iseg_plugin.export.export_onnx_int` is imported with Relax's ONNX frontend,
legalized to TIR and compiled for the host CPU (``llvm``), with no tuning: TVM 0.27 has no Relay, and
its PyTorch frontend mistypes integer floor division (ecosystem notes §5.2), so ONNX is the way in.
Every tensor stays integer-typed, as in onnxruntime, and the outputs are the same integers (tested).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx


class TvmMissingError(ImportError):
    """apache-tvm is not installed."""


def _tvm():
    try:
        import tvm
        from tvm import relax
        from tvm.relax.frontend.onnx import from_onnx
    except ImportError as err:
        raise TvmMissingError(
            "apache-tvm is not installed; install the extra: pip install -e '.[tvm]' (apache-tvm 0.27)") from err
    return tvm, relax, from_onnx


class TvmModel:
    """A compiled integer-only graph: ``model(pixels)`` takes a (1, 3, H, W) uint8 array and
    returns the graph's outputs (INT16 logits, int64 class map) as numpy arrays."""

    def __init__(self, proto: onnx.ModelProto | str | Path, target: str = "llvm"):
        tvm, relax, from_onnx = _tvm()
        proto = proto if isinstance(proto, onnx.ModelProto) else onnx.load(str(proto))
        shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
        self.input_shape = tuple(shape)
        module = relax.transform.LegalizeOps()(from_onnx(proto, keep_params_in_input=False))
        self._device = tvm.cpu()
        self._vm = relax.VirtualMachine(tvm.compile(module, target=target), self._device)
        self._tensor = tvm.runtime.tensor

    def __call__(self, pixels: np.ndarray) -> list[np.ndarray]:
        if pixels.dtype != np.uint8 or pixels.shape != self.input_shape:
            raise ValueError(f"expected uint8 pixels of shape {self.input_shape}, got {pixels.dtype} {pixels.shape}")
        outputs = self._vm["main"](self._tensor(np.ascontiguousarray(pixels), self._device))
        return [out.numpy() for out in outputs]

"""One-call wrappers: ``prepare`` (torch.ao's ``prepare_fx`` / ``prepare_qat_fx`` with the plugin's configs),
``convert`` (the registry's lowering of the prepared graph to an integer-only model) and ``trainable``
(the same lowering as a model that trains: QAT on the integer arithmetic itself).

They make mmseg segmentors traceable, turn tracing failures into an error that names the module,
and silence torch.ao's deprecation warning around their own calls only.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch import Tensor, fx, nn
from torch.ao.quantization import QConfigMapping
from torch.ao.quantization.quantize_fx import prepare_fx, prepare_qat_fx

from ..lowering import lower
from ..lowering.normalize_attention import make_traceable, needs_rewrite
from ..lowering.trace import locate_trace_failure

from .config import get_iseg_backend_config, get_iseg_qconfig_mapping


@contextlib.contextmanager
def _torch_ao_quietly():
    """torch 2.13 marks torch.ao's FX quantization deprecated on every call; quiet it here only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated", category=DeprecationWarning)
        yield


class SegmentorLogits(nn.Module):
    """An mmseg segmentor's tensor-mode forward (backbone, neck, decode head -> logits), traceable.

    mmseg's ``forward(inputs, data_samples, mode)`` branches on ``mode`` and calls
    ``decode_head.forward`` directly, which FX would trace into instead of treating it as a pattern.
    """

    def __init__(self, segmentor: nn.Module):
        super().__init__()
        self.backbone = segmentor.backbone
        self.neck = segmentor.neck if getattr(segmentor, "with_neck", False) else None
        self.decode_head = segmentor.decode_head

    def forward(self, inputs):
        feats = self.backbone(inputs)
        if self.neck is not None:
            feats = self.neck(feats)
        return self.decode_head(feats)


def traceable(model: nn.Module) -> nn.Module:
    """What FX traces for ``model``: an mmseg segmentor's logits forward, or the model itself; torch's attention
    blocks (``nn.MultiheadAttention``, ``nn.TransformerEncoder(Layer)``, leaves for FX) rewritten in a copy
    (:func:`iseg_plugin.lowering.normalize_attention.make_traceable`)."""
    if needs_rewrite(model):
        model = make_traceable(model)
    is_segmentor = hasattr(model, "decode_head") and hasattr(model, "backbone") and hasattr(model, "extract_feat")
    return SegmentorLogits(model) if is_segmentor else model


class FxTraceError(RuntimeError):
    """torch.fx could not trace a module of the model."""


def _locate_trace_failure(model: nn.Module, err: Exception) -> FxTraceError | None:
    located = locate_trace_failure(model)
    if located is not None:
        name, module = located
        cls = type(module).__name__
        return FxTraceError(
            f"torch.fx cannot trace module '{name or '(root)'}' ({cls}): {type(err).__name__}: {err}\n"
            f"Remove the data-dependent control flow from its forward, or mark it a leaf (FX then calls it without "
            f"tracing into it, and fxp.convert refuses it unless a registry entry lowers it): "
            f"PrepareCustomConfig().set_non_traceable_module_classes([{cls}]) or "
            f".set_non_traceable_module_names(['{name}']) as prepare_custom_config. Or quantize through torch.export, "
            f"which traces such code: fx_patterns.prepare_pt2e(model, example_inputs)"
        )
    return None


def prepare(model: nn.Module, example_inputs: tuple, qconfig_mapping: QConfigMapping | None = None,
            qat: bool = False, prepare_custom_config=None, **options) -> fx.GraphModule:
    """``prepare_fx`` (or ``prepare_qat_fx`` with ``qat=True``) with the plugin's configs.

    ``options`` (``gelu``, ``softmax``, ``momentum``) go to :func:`get_iseg_qconfig_mapping` when no
    mapping is given. Run the result on calibration inputs (or train it), then :func:`convert`.
    """
    model = traceable(model)
    mapping = qconfig_mapping if qconfig_mapping is not None else get_iseg_qconfig_mapping(qat=qat, **options)
    fn = prepare_qat_fx if qat else prepare_fx
    with _torch_ao_quietly():
        try:
            return fn(model, mapping, example_inputs, prepare_custom_config=prepare_custom_config,
                      backend_config=get_iseg_backend_config())
        except Exception as err:
            located = _locate_trace_failure(model, err)
            if located is None:
                raise
            raise located from err


class IntegerModel(nn.Module):
    """The integer-only model: checks its inputs (dtype, shape), then runs the lowered graph.

    ``input_formats``: (scale, integer bounds) of each input; ``output_scales``: the real scale of
    each integer output, in the order of the float model's outputs.
    """

    def __init__(self, graph_module: fx.GraphModule, pixels: bool):
        super().__init__()
        self.graph_module = graph_module
        self.input_shapes = [tuple(s) for s in graph_module.input_shapes]
        self.input_formats = list(graph_module.input_formats)
        self.output_scales = list(graph_module.output_scales)
        self.pixels = pixels

    def forward(self, *inputs: Tensor):
        for i, (x, shape) in enumerate(zip(inputs, self.input_shapes)):
            if not isinstance(x, Tensor) or x.dtype.is_floating_point or x.dtype.is_complex:
                what = x.dtype if isinstance(x, Tensor) else type(x).__name__
                need = "uint8 RGB pixels" if self.pixels else "integers (fx_patterns.quantize_inputs(model, x))"
                raise TypeError(f"input {i} of the integer model must be {need}, got {what}")
            if tuple(x.shape) != shape:
                raise ValueError(f"input {i} has shape {tuple(x.shape)}; this integer model was converted for "
                                 f"{shape}: convert it again with example inputs of that shape")
            low, high = self.input_formats[i][1]
            if x.numel() and (int(x.min()) < low or int(x.max()) > high):  # (a wider integer dtype would wrap)
                need = "pass uint8 RGB pixels" if self.pixels else "make it with fx_patterns.quantize_inputs(model, x)"
                raise ValueError(f"input {i} holds {int(x.min())}..{int(x.max())}, outside the integer model's input "
                                 f"grid {low}..{high}: {need}, not by rounding the float input")
        return self.graph_module(*inputs)


def convert(prepared: fx.GraphModule, example_inputs: tuple, pixels: dict | None = None) -> IntegerModel:
    """Lower a prepared, calibrated model to an integer-only one, for ``example_inputs``' shapes.

    ``pixels=dict(mean=..., std=...)``: the model takes an image normalised with them; the integer
    model then takes uint8 RGB pixels (the normalisation folded into its first requantization).
    """
    with torch.no_grad():
        return IntegerModel(lower(prepared, tuple(example_inputs), pixels), pixels is not None)


def trainable(prepared: fx.GraphModule, example_inputs: tuple, pixels: dict | None = None,
              observe: bool = False) -> fx.GraphModule:
    """The integer model of :func:`convert` in its trainable form, for ``example_inputs``' shapes.

    It runs the deployed modules on float64 tensors holding the integers (``quantize_inputs(...)`` as
    float64, or pixels 0..255 with ``pixels=``) and returns the same integers as the converted model;
    its integer weights, biases, LayerNorm affines and embeddings are computed from the prepared model's
    float parameters with straight-through rounding, so a loss on its output trains them. Scales are
    frozen (the observed ranges; ``observe=True`` first updates them from ``example_inputs``). Build it
    again after each optimizer step: it holds the integers of the parameters it was built from.
    """
    return lower(prepared, tuple(example_inputs), pixels, trainable=True, observe=observe)

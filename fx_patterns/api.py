"""One-call wrappers around torch.ao's ``prepare_fx`` / ``prepare_qat_fx`` / ``convert_fx``.

They pass the plugin's configs, check the qconfig mapping first, make mmseg segmentors and lone
pattern modules traceable, turn tracing failures into an error that names the module, and silence
torch.ao's deprecation warning around their own calls only.
"""
from __future__ import annotations

import contextlib
import warnings

from torch import fx, nn
from torch.ao.quantization import QConfigMapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx

from .patterns import (
    FLOAT_MODULES,
    check_qconfig_mapping,
    get_iseg_backend_config,
    get_iseg_convert_custom_config,
    get_iseg_prepare_custom_config,
    get_iseg_qconfig_mapping,
)


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
    """What FX traces for ``model``: an mmseg segmentor's logits forward, a lone pattern module
    inside a container (the root of a trace is never swapped), or the model itself."""
    from mmseg.models.segmentors import BaseSegmentor

    if isinstance(model, BaseSegmentor):
        return SegmentorLogits(model)
    if isinstance(model, FLOAT_MODULES):
        return nn.Sequential(model)
    return model


class FxTraceError(RuntimeError):
    """torch.fx could not trace a module of the model."""


class _LocatingTracer(fx.Tracer):
    """Traces like torch.ao (pattern modules are leaves) and remembers which module it is inside."""

    def __init__(self):
        super().__init__()
        self.stack: list[tuple[str, nn.Module]] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, FLOAT_MODULES) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.stack.append((self.path_of_module(m), m))
        out = super().call_module(m, forward, args, kwargs)
        self.stack.pop()
        return out


def _locate_trace_failure(model: nn.Module, err: Exception) -> FxTraceError | None:
    tracer = _LocatingTracer()
    try:
        tracer.trace(model)
    except Exception:  # noqa: BLE001 - any failure here is the one to explain
        name, module = tracer.stack[-1] if tracer.stack else ("", model)
        cls = type(module).__name__
        return FxTraceError(
            f"torch.fx cannot trace module '{name or '(root)'}' ({cls}): {type(err).__name__}: {err}\n"
            f"Mark it a leaf so FX calls it without tracing into it (it then stays float): "
            f"PrepareCustomConfig().set_non_traceable_module_classes([{cls}]) or "
            f".set_non_traceable_module_names(['{name}']) and pass it as prepare_custom_config; or remove the "
            f"data-dependent control flow from its forward"
        )
    return None


def prepare(model: nn.Module, example_inputs: tuple, qconfig_mapping: QConfigMapping | None = None,
            qat: bool = False, prepare_custom_config=None, **options) -> fx.GraphModule:
    """``prepare_fx`` (or ``prepare_qat_fx`` with ``qat=True``) with the plugin's configs.

    ``options`` go to :func:`get_iseg_qconfig_mapping` when no mapping is given. Run the result on
    calibration images (or train it), then :func:`convert`.
    """
    model = traceable(model)
    mapping = qconfig_mapping if qconfig_mapping is not None else get_iseg_qconfig_mapping(**options)
    check_qconfig_mapping(model, mapping)
    custom = prepare_custom_config if prepare_custom_config is not None else get_iseg_prepare_custom_config()
    fn = prepare_qat_fx if qat else prepare_fx
    with _torch_ao_quietly():
        try:
            return fn(model, mapping, example_inputs, prepare_custom_config=custom,
                      backend_config=get_iseg_backend_config())
        except Exception as err:
            located = _locate_trace_failure(model, err)
            if located is None:
                raise
            raise located from err


def convert(prepared: fx.GraphModule) -> fx.GraphModule:
    """``convert_fx`` with the plugin's configs: the integer-only model (uint8 pixels in)."""
    with _torch_ao_quietly():
        return convert_fx(prepared, convert_custom_config=get_iseg_convert_custom_config(),
                          backend_config=get_iseg_backend_config())

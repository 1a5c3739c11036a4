"""torch.ao FX quantization to the integer-only Segmenter: BackendConfig, QConfigMapping, custom configs.

    from torch.ao.quantization.quantize_fx import prepare_fx, convert_fx
    import fx_patterns as fxp

    prepared = prepare_fx(model, fxp.get_iseg_qconfig_mapping(mean=..., std=...), example_inputs,
                          prepare_custom_config=fxp.get_iseg_prepare_custom_config(),
                          backend_config=fxp.get_iseg_backend_config())
    for images in calibration_images:  # normalised float images, as the float model takes
        prepared(images)
    int_model = convert_fx(prepared, convert_custom_config=fxp.get_iseg_convert_custom_config(),
                           backend_config=fxp.get_iseg_backend_config())
    logits = int_model(uint8_rgb_pixels)  # integer-only

``fxp.prepare`` / ``fxp.convert`` do the same in one call each, with checks and clearer errors.
"""
from .api import FxTraceError, SegmentorLogits, convert, prepare, traceable
from .modules import IntEncoder, IntMaskHead, IntPooledLinearHead, ObservedEncoder, ObservedMaskHead, ObservedPooledHead
from .patterns import (
    PATTERNS,
    UnsupportedQConfigError,
    check_qconfig_mapping,
    get_iseg_backend_config,
    get_iseg_convert_custom_config,
    get_iseg_prepare_custom_config,
    get_iseg_qconfig_mapping,
)
from .qconfig import IsegActivationObserver, get_iseg_qconfig

__all__ = [
    "FxTraceError",
    "SegmentorLogits",
    "convert",
    "prepare",
    "traceable",
    "IntEncoder",
    "IntMaskHead",
    "IntPooledLinearHead",
    "ObservedEncoder",
    "ObservedMaskHead",
    "ObservedPooledHead",
    "PATTERNS",
    "UnsupportedQConfigError",
    "check_qconfig_mapping",
    "get_iseg_backend_config",
    "get_iseg_convert_custom_config",
    "get_iseg_prepare_custom_config",
    "get_iseg_qconfig_mapping",
    "IsegActivationObserver",
    "get_iseg_qconfig",
]

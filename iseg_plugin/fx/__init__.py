"""The FX and PT2E front ends (torch.ao ``prepare_fx`` with configs read from the registry; torchao PT2E with
:class:`ISegQuantizer`), published as the package ``fx_patterns``. They live here so that the rest of the plugin
(the Segmenter's own lowering, the deploy step) uses them without importing ``fx_patterns``: that package
imports ``iseg_plugin``, never the reverse."""
from ..lowering import LoweringError, quantize_inputs
from .api import FxTraceError, IntegerModel, SegmentorLogits, convert, prepare, traceable, trainable
from .config import get_iseg_backend_config, get_iseg_qconfig_mapping, iseg_qconfig

__all__ = ["FxTraceError", "IntegerModel", "LoweringError", "SegmentorLogits", "convert", "get_iseg_backend_config",
           "get_iseg_qconfig_mapping", "iseg_qconfig", "prepare", "quantize_inputs", "traceable", "trainable"]

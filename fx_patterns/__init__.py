"""torch.ao FX quantization, op by op, to an integer-only model (any float ViT, not only the plugin's).

    from torch.ao.quantization.quantize_fx import prepare_fx
    import fx_patterns as fxp

    prepared = prepare_fx(model, fxp.get_iseg_qconfig_mapping(gelu="poly", softmax="bit-exp"), example_inputs,
                          backend_config=fxp.get_iseg_backend_config())
    for batch in calibration_batches:
        prepared(batch)
    int_model = fxp.convert(prepared, example_inputs)   # integer-only; refuses what it cannot lower
    logits = int_model(*fxp.quantize_inputs(int_model, x))

The same through torchao PT2E: ``prepare_pt2e(torch.export.export(model, example_inputs).module(),
fxp.ISegQuantizer())`` (or ``fxp.prepare_pt2e(model, example_inputs)``), calibrate, ``fxp.convert``.

``fxp.prepare`` / ``fxp.convert`` wrap the same calls (``qat=True`` for ``prepare_qat_fx``), name a
module FX cannot trace, and silence torch.ao's deprecation warning around their own calls only.
QAT on the integer arithmetic itself: ``fxp.trainable(prepared, example_inputs)`` is the converted model
in a form whose loss trains the float parameters (straight-through rounding); rebuild it every step.

The code is in :mod:`iseg_plugin.fx` (this package is its public name; it imports ``iseg_plugin``, never the reverse).
"""
from iseg_plugin.fx import (FxTraceError, IntegerModel, LoweringError, SegmentorLogits, convert, get_iseg_backend_config,
                            get_iseg_qconfig_mapping, iseg_qconfig, prepare, quantize_inputs, traceable, trainable)

__all__ = [
    "FxTraceError",
    "ISegQuantizer",
    "IntegerModel",
    "LoweringError",
    "SegmentorLogits",
    "convert",
    "prepare",
    "prepare_pt2e",
    "quantize_inputs",
    "traceable",
    "trainable",
    "get_iseg_backend_config",
    "get_iseg_qconfig_mapping",
    "iseg_qconfig",
]


def __getattr__(name: str):
    """The PT2E front end imports torchao: loaded on first use only."""
    if name in ("ISegQuantizer", "prepare_pt2e"):
        from iseg_plugin.fx import pt2e

        return getattr(pt2e, name)
    raise AttributeError(f"module 'fx_patterns' has no attribute {name!r}")

"""Registers the plugin's models and hooks in MMSegmentation's registries (on import)."""
from mmseg.registry import HOOKS, MODELS

from ..models import ISegmenterMaskHead, IVisionTransformer
from .compat import allow_cpu_distributed
from .hooks import CalibrationHook, PlainCheckpointHook, QATHook, calibrate
from .segmentor import ISegmenter

for _cls in (IVisionTransformer, ISegmenterMaskHead, ISegmenter):
    MODELS.register_module(module=_cls)
for _cls in (CalibrationHook, QATHook, PlainCheckpointHook):
    HOOKS.register_module(module=_cls)
allow_cpu_distributed()

__all__ = ["ISegmenter", "CalibrationHook", "QATHook", "PlainCheckpointHook", "calibrate"]

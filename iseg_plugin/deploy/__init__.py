"""The deployed integer-only model: integer modules, the conversion step, the float-op audit."""
from .audit import OpAudit, OpRecord
from .convert import convert
from .segmenter import DeployedSegmenter

__all__ = ["OpAudit", "OpRecord", "convert", "DeployedSegmenter"]

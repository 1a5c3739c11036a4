"""The deployed integer-only model: the Segmenter's conversion, its file format, the float-op audit."""
from .audit import OpAudit, OpRecord
from .convert import calibrate_prepared, convert, prepare_segmenter
from .segmenter import DeployedSegmenter

__all__ = ["OpAudit", "OpRecord", "calibrate_prepared", "convert", "prepare_segmenter", "DeployedSegmenter"]

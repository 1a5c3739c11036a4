"""Graph passes from a prepared (observed) float graph to the integer-only model."""
from .lower import Const, LoweringError, Operand, Site, describe, lower, quantize_inputs

__all__ = ["Const", "LoweringError", "Operand", "Site", "describe", "lower", "quantize_inputs"]

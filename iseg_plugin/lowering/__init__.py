"""Graph passes from a prepared (observed) float graph to the integer-only model."""
from .lower import Const, LoweringError, Operand, Site, consumer_bits, describe, lower, quantize_inputs, static_nodes

__all__ = ["Const", "LoweringError", "Operand", "Site", "consumer_bits", "describe", "lower", "quantize_inputs",
           "static_nodes"]

"""Graph passes from a prepared (observed) float graph to the integer-only model."""
from .lower import (Const, LoweringError, Operand, Site, consumer_bits, describe, feeds_output, is_observer,
                    is_shape_query, lower, observer_of, output_grid, quantize_inputs, static_nodes)

__all__ = ["Const", "LoweringError", "Operand", "Site", "consumer_bits", "describe", "feeds_output", "is_observer",
           "is_shape_query", "lower", "observer_of", "output_grid", "quantize_inputs", "static_nodes"]

"""A grid: the scale and integer bounds a value is stored on, and its kind. The lowering's values
(:class:`~iseg_plugin.ops.site.Operand`), the registry's ``build`` functions and the Brevitas layers read this one
type; the kind is decided here, once (:meth:`Grid.of`), not from bounds at each use."""
from __future__ import annotations

from dataclasses import dataclass

SOFTMAX_BITS = 16  # probabilities in [0, 2**15], read by the next GEMM as two int8 halves
PROBABILITY_SCALE = 2.0 ** -(SOFTMAX_BITS - 1)

INT8, ASYMMETRIC_INT8, INT16, PROBABILITIES, WIDE = "int8", "asymmetric int8", "int16", "probabilities", "wide"


@dataclass(frozen=True)
class Grid:
    """``value = scale * integer``, integers in ``bounds``; ``kind``: INT8 (symmetric, a GEMM's operand),
    ASYMMETRIC_INT8 (256 levels not centred on 0, e.g. a GELU's output: a GEMM reads it shifted by
    :attr:`int8_offset`), INT16 (the residual stream), PROBABILITIES (a softmax's [0, 2**15] at 2**-15), WIDE
    (anything else: accumulators, narrow or unsigned ranges)."""

    scale: float  # (a tensor of one scale per channel for an accumulator's grid)
    bounds: tuple[int, int]
    kind: str

    @classmethod
    def of(cls, scale: float, bounds: tuple[int, int]) -> "Grid":
        lo, hi = int(bounds[0]), int(bounds[1])
        scale = scale if isinstance(scale, float) or getattr(scale, "numel", lambda: 1)() != 1 else float(scale)
        if (lo, hi) == (-128, 127):
            kind = INT8
        elif hi - lo == 255:
            kind = ASYMMETRIC_INT8
        elif (lo, hi) == (-32768, 32767):
            kind = INT16
        elif lo == 0 and hi in (1 << (SOFTMAX_BITS - 1), (1 << SOFTMAX_BITS) - 1) and scale == PROBABILITY_SCALE:
            # (Brevitas' layers carry them as an unsigned 16-bit tensor at that scale)
            kind = PROBABILITIES
        else:
            kind = WIDE
        return cls(scale, (lo, hi), kind)

    @classmethod
    def probabilities(cls) -> "Grid":
        return cls.of(PROBABILITY_SCALE, (0, 1 << (SOFTMAX_BITS - 1)))

    @property
    def int8_offset(self) -> int:
        """What brings an ASYMMETRIC_INT8 value into int8 (subtracted before a GEMM); 0 for other grids."""
        return self.bounds[0] + 128 if self.kind == ASYMMETRIC_INT8 else 0

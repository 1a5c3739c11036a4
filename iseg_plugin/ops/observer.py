"""The one activation observer of the per-op front ends: a torch.ao observer that records ranges.

It is a ``MinMaxObserver`` (so ``prepare_fx`` / ``prepare_qat_fx`` / torchao's ``prepare_pt2e`` accept
it) with what the integer lowering needs:

* the range (:func:`iseg_plugin.intops.running_minmax`): by default (``momentum`` None) the extremes of every
  value seen, as torch.ao's ``MinMaxObserver`` (PTQ calibration); with ``momentum``, an EMA with that update
  weight, the first batch taken as it is (QAT's warm-up follows the training batches with 0.01, the paper's).
  The paper's PTQ rule, an EMA with update 0.05, stays near the first batch's range over the few batches of a
  calibration and clips the values of later, different images: on the families harness's 8 photos in 4
  batches (docs/families.md), 9-11 % of the attention outputs of torch's encoder layers and 1-7 % of
  UPerNet's pooled features lay outside it (logits' cosine to the float model 0.988 and 0.980; 0.9999 and
  0.9996 with the extremes);
* ``variant`` names the registry variant of the op whose output it observes (GELU, softmax), so a
  qconfig chooses the integer operator per op type or per module, as torch.ao's qconfigs do;
* a bounded sample of the values it saw, for operators whose constants are fitted to the data
  (Poly-GELU's quartic), and the mean square of each channel of the last dimension (the mean over the
  batches; an EMA with ``momentum``), which weighs the INT4 weight error of a Linear reading the value
  (:func:`intops.weight_scale`);
* ``symmetric``: keep a symmetric grid where the op would choose an asymmetric one (GELU's INT8
  output; Brevitas' ``QuantLinear`` carries no input zero point into its accumulator);
* ``weight_bits``: the weight width of the GEMM whose output it observes (8, or 4 for W4A8), and that
  GEMM's calibrated weight integers and scales where a PTQ step computed them (``weight_int``,
  ``weight_scale``: :mod:`iseg_plugin.gptq`; empty otherwise);
* the extremes of every batch it saw (``seen_min``, ``seen_max``; the range itself without ``momentum``):
  the model's outputs (the logits an argmax reads) are on a grid covering them with headroom,
  :meth:`covering_scale` (used by the lowering for values the model outputs, and by the Brevitas swap).

``variant`` and ``weight_bits`` are the site's choices (a qconfig's, or the per-layer selection of
:mod:`iseg_plugin.select`). They are held in integer buffers (the variant's name as its bytes), so they
travel with the state dict and a checkpoint or a calibration record rebuilds the same integer model
(``get_extra_state`` would do it too, but ``torch.jit`` tracing takes every state-dict entry for a tensor).

Its torch.ao dtype is nominal (``qint8``): the bit width of each value is decided at lowering by the
operator that consumes it (INT8 into a GEMM, INT16 along the residual stream), from this range.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.ao.quantization.observer import MinMaxObserver

from .. import intops

SAMPLES_PER_BATCH = 4096
MAX_SAMPLES = 65536
# The output grid covers the extremes of calibration with one spare bit: values of calibration-like inputs a little
# beyond them, and the integer model's own error at them, stay off the grid's limits (an INT16 output keeps 14 bits
# for what calibration saw).
OUTPUT_HEADROOM = 2.0


class IsegObserver(MinMaxObserver):
    def __init__(self, momentum: float | None = None, variant: str | None = None, symmetric: bool = False,
                 weight_bits: int = 8, **kwargs):
        kwargs.setdefault("dtype", torch.qint8)
        kwargs.setdefault("qscheme", torch.per_tensor_symmetric)
        super().__init__(**kwargs)
        if momentum is not None and not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be None or in (0, 1], got {momentum}")
        self.momentum = momentum
        self.register_buffer("variant_name", torch.zeros(0, dtype=torch.uint8))
        self.register_buffer("gemm_weight_bits", torch.tensor(8))
        self.variant = variant
        self.symmetric = symmetric
        self.weight_bits = weight_bits
        self.register_buffer("samples", torch.zeros(0))
        self.register_buffer("channel_energy", torch.zeros(0))
        self.register_buffer("weight_int", torch.zeros(0, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("batches", torch.tensor(0))
        self.register_buffer("seen_min", torch.zeros(0))  # (empty: a record written before they were kept)
        self.register_buffer("seen_max", torch.zeros(0))

    def extra_repr(self) -> str:
        return (f"momentum={self.momentum}, variant={self.variant}, symmetric={self.symmetric}, "
                f"weight_bits={self.weight_bits}, batches={int(self.batches)}")

    @property
    def variant(self) -> str | None:
        return bytes(self.variant_name.tolist()).decode() or None

    @variant.setter
    def variant(self, name: str | None) -> None:
        self.variant_name = torch.tensor(list((name or "").encode()), dtype=torch.uint8)

    @property
    def weight_bits(self) -> int:
        return int(self.gemm_weight_bits)

    @weight_bits.setter
    def weight_bits(self, bits: int) -> None:
        self.gemm_weight_bits = torch.tensor(int(bits))

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.numel() == 0:  # torch.ao also observes tuples (chunk): not values
            return x
        real = x.detach().float()  # ranges in float32 even in a float64 model: the same scales in both
        running = (self.min_val.float(), self.max_val.float()) if int(self.batches) else None
        cur_lo, cur_hi = intops.channel_minmax(real)  # (one pass: the range and the extremes read it)
        lo, hi = intops.range_step(running, (cur_lo, cur_hi), self.momentum)
        self.min_val.resize_(lo.shape).copy_(lo)
        self.max_val.resize_(hi.shape).copy_(hi)
        if int(self.batches) and self.seen_min.numel():
            cur_lo, cur_hi = torch.minimum(self.seen_min, cur_lo), torch.maximum(self.seen_max, cur_hi)
        self.seen_min, self.seen_max = cur_lo.reshape(1), cur_hi.reshape(1)
        if real.dim() >= 2:
            energy = real.pow(2).flatten(0, -2).mean(0)
            if int(self.batches) and self.channel_energy.shape == energy.shape:  # (no momentum: every batch alike)
                weight = self.momentum if self.momentum is not None else 1.0 / (int(self.batches) + 1)
                energy = (1 - weight) * self.channel_energy + weight * energy
            self.channel_energy = energy
        flat = real.flatten()
        step = max(1, flat.numel() // SAMPLES_PER_BATCH)
        self.samples = torch.cat([self.samples, flat[::step]])[-MAX_SAMPLES:]
        self.batches += 1
        return x

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("samples", "channel_energy", "weight_int", "weight_scale", "variant_name", "gemm_weight_bits",
                     "seen_min", "seen_max"):
            key = prefix + name
            if key in state_dict:  # sizes vary: take the saved ones'
                setattr(self, name, torch.empty_like(state_dict[key]))
            elif name.startswith("seen_"):  # a record written before the extremes were kept: its (EMA) range only
                state_dict[key] = torch.zeros(0)
                setattr(self, name, torch.zeros(0))
            else:  # a record written before these existed keeps what this observer was built with
                state_dict[key] = getattr(self, name)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def calibrated(self) -> bool:
        return int(self.batches) > 0

    def real_range(self) -> tuple[float, float]:
        return float(self.min_val), float(self.max_val)

    def scale(self, bits: int) -> float:
        """The symmetric scale of a signed ``bits``-wide grid over the observed range."""
        return float(intops.symmetric_scale(self.min_val.float(), self.max_val.float(), bits))

    def covering_range(self) -> tuple[Tensor, Tensor]:
        """The range widened to every value seen (with ``momentum``, the EMA range is narrower; a record without
        the extremes: its range alone)."""
        lo, hi = self.min_val.float(), self.max_val.float()
        if self.seen_min.numel():
            lo = torch.minimum(lo, self.seen_min.float().reshape(lo.shape))
            hi = torch.maximum(hi, self.seen_max.float().reshape(hi.shape))
        return lo, hi

    def covering_scale(self, bits: int) -> float:
        """The symmetric scale of a model output's ``bits``-wide grid: every value seen in calibration, with
        ``OUTPUT_HEADROOM`` (none of them reaches the grid's limits). A record written before the extremes were
        kept has the grid of its range, as it had: the same integers."""
        if not self.seen_min.numel():
            return self.scale(bits)
        lo, hi = self.covering_range()
        return float(intops.symmetric_scale(lo * OUTPUT_HEADROOM, hi * OUTPUT_HEADROOM, bits))

"""The integer operators as Brevitas layers.

Each layer reads the integers and scale of its ``IntQuantTensor`` input(s), builds the registry's deployed
module for those scales with its entry's ``build`` (the constants computed as at conversion: the same call
as the FX / PT2E lowering's) and
runs it on float tensors holding the integers, where every step is an :mod:`iseg_plugin.intops`
function with a straight-through gradient: the integers are those of the deployed model (one
arithmetic), and QAT trains through them. The output is an ``IntQuantTensor`` at the scale of the
layer's output quantizer, a Brevitas activation quantizer (``act_quant``, default INT8 or INT16 per
tensor; a ``QuantIdentity`` whose statistics Brevitas collects as for its own layers).

Under Brevitas' ``calibration_mode`` (quantization disabled) a layer runs its float op, lets its
output quantizer observe the result, as Brevitas' own layers do, and passes the float result on (so
that the next layer also sees the float model's values). With quantization enabled a plain
float input is refused: the layer would otherwise quantize with float arithmetic.

Exactness: the integers are exact when the input values are (a float32 ``IntQuantTensor`` holds
integers times a scale; run the model in float64 for INT32 accumulators beyond 2**24).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from brevitas.common import ExportMixin
from brevitas.nn import QuantIdentity
from brevitas.quant import Int8ActPerTensorFloat
from brevitas.quant_tensor import IntQuantTensor, QuantTensor
from torch import Tensor, nn

from .. import intops
from ..ops import modules as M
from ..ops.entries import reduced_count
from ..ops.grid import PROBABILITIES, PROBABILITY_SCALE, SOFTMAX_BITS, Grid
from ..ops.observer import IsegObserver
from ..ops.registry import REGISTRY

Int16ActPerTensorFloat = Int8ActPerTensorFloat.let(bit_width=16)


def _value(x) -> Tensor:
    return x.value if isinstance(x, QuantTensor) else x


def _integers(x, layer: nn.Module, accumulator: bool = False) -> tuple[Tensor, Tensor]:
    """The integers an ``IntQuantTensor`` holds (float, straight-through) and its scale: ``value / scale``.
    An ``accumulator`` may carry a zero point (Brevitas' ``QuantConv2d`` records its bias as one); other
    operands must be symmetric."""
    if not isinstance(x, IntQuantTensor):
        raise TypeError(f"{type(layer).__name__} takes an IntQuantTensor, got {type(x).__name__}: put a "
                        f"QuantIdentity(return_quant_tensor=True) or a layer with return_quant_tensor=True in front")
    if not accumulator and bool((x.zero_point != 0).any()):
        raise ValueError(f"{type(layer).__name__} takes symmetric operands (zero point 0), got zero point "
                         f"{x.zero_point.flatten()[:4].tolist()}")
    return intops.round_ste(x.value / x.scale), x.scale


def _ratio_scale(scale: Tensor) -> Tensor | float:
    """A scale for a requantization ratio: a number, or one per channel of the last dimension."""
    scale = scale.detach().double()
    if scale.numel() == 1:
        return float(scale)
    if scale.shape[-1] != scale.numel():
        raise ValueError(f"a per-channel scale must run along the last dimension, got shape {tuple(scale.shape)}")
    return scale.flatten()


def _channel_dim(scale: Tensor) -> int | None:
    """The dimension of a per-channel scale that is not the last (a convolution's: dim 1), else None."""
    if scale.numel() == 1 or scale.shape[-1] == scale.numel():
        return None
    return next(d for d, n in enumerate(scale.shape) if n == scale.numel())


def _per_tensor(scale: Tensor, layer: nn.Module, what: str) -> float:
    if scale.numel() != 1:
        raise ValueError(f"{type(layer).__name__} takes a per-tensor {what} scale, got {scale.numel()} scales: "
                         "requantize it first (DyadicRequant)")
    return float(scale.detach())


@dataclass
class _Grid:
    """An output format: scale (with its gradient), bit width, signedness and integer bounds."""

    scale: Tensor
    bit_width: Tensor
    signed: bool
    bounds: tuple[int, int]

    def value(self) -> Grid:
        """The grid as the registry's builds take it."""
        return Grid.of(float(self.scale.detach()), self.bounds)

    def tensor(self, integers: Tensor, training: bool) -> IntQuantTensor:
        integers = integers.to(self.scale.dtype)  # (the integer steps may widen to float64: back to the model's type)
        return IntQuantTensor(integers * self.scale, self.scale, torch.zeros_like(self.scale), self.bit_width,
                              self.signed, training)


def _build(entry: str, variant: str | None, attributes: dict, inputs, out: _Grid | None) -> nn.Module:
    """The registry's deployed module for these inputs (scales, or Grids where the kind matters) and output."""
    inputs = tuple(g if g is None or isinstance(g, Grid) else Grid.of(g, (-32768, 32767)) for g in inputs)
    return REGISTRY[entry].variant(variant).build(attributes, inputs, None if out is None else out.value())


def _fixed_grid(scale: float, bits: int, signed: bool, like: Tensor) -> _Grid:
    scale_t = torch.tensor(scale, dtype=like.dtype)
    return _Grid(scale_t, torch.tensor(float(bits)), signed, intops.int_range(bits, signed=signed))


class _Layer(ExportMixin, nn.Module):
    """A plugin layer: ``forward`` runs the layer, or, in Brevitas' export mode, its export handler (given by
    :class:`iseg_plugin.export.brevitas_qonnx.IsegQONNXManager`), which writes the deployed module that the last
    eval forward ran (``export_record``) as QONNX nodes."""

    def __init__(self):
        nn.Module.__init__(self)
        ExportMixin.__init__(self)
        self.export_record = None  # (deployed module, output grid) of the last eval forward

    @property
    def requires_export_handler(self) -> bool:
        return True

    def forward(self, *inputs):
        return self.export_handler(*inputs) if self.export_mode else self._forward(*inputs)

    def _run(self, deployed: nn.Module, grid: _Grid, *integers: Tensor) -> IntQuantTensor:
        if not self.training:
            self.export_record = (deployed, grid)
        return grid.tensor(deployed(*integers), self.training)


class _QuantOutput(_Layer):
    """A layer whose output grid comes from a Brevitas activation quantizer. Its ``deployed(in_scales)`` is the
    registry's deployed module for those input scales and the current output grid: what ``forward`` runs."""

    def __init__(self, act_quant, **kwargs):
        super().__init__()
        self.output_quant = QuantIdentity(act_quant=act_quant, return_quant_tensor=True, **kwargs)

    @property
    def quantizing(self) -> bool:
        """False under Brevitas' calibration mode (its quantizers only observe) or with quantization disabled:
        then the float op runs and the output quantizer observes it."""
        proxy = self.output_quant.act_quant
        observing = any(getattr(m, "observer_only", False) for m in proxy.modules())
        return proxy.is_quant_enabled and not observing

    def grid(self, reference: Callable[[], Tensor] | None = None) -> _Grid:
        """The output grid; in training the float op's output (``reference()``, computed only then) updates the
        quantizer's statistics first."""
        proxy = self.output_quant.act_quant
        if self.training and reference is not None:
            q = self.output_quant(reference())
            scale, bit_width, signed = q.scale, q.bit_width, q.signed
        else:
            scale, bit_width, signed = proxy.scale(), proxy.bit_width(), proxy.is_signed
        bounds = intops.int_range(int(bit_width), narrow=bool(proxy.is_narrow_range), signed=bool(signed))
        return _Grid(scale, bit_width, bool(signed), bounds)

    def requant(self, in_scale, grid: _Grid) -> M.Requant:
        return M.Requant.between(in_scale, float(grid.scale.detach()), grid.bounds)


class DyadicRequant(_QuantOutput):
    """Requantize an ``IntQuantTensor`` (e.g. a ``QuantLinear``'s INT32 accumulator, per tensor or per output
    channel) to this layer's output grid with an integer multiplier and shift (round half up, saturating)."""

    def __init__(self, act_quant=Int8ActPerTensorFloat, **kwargs):
        super().__init__(act_quant, **kwargs)

    def _forward(self, x):
        if not self.quantizing:
            return _value(self.output_quant(_value(x)))
        integers, scale = _integers(x, self, accumulator=True)
        grid = self.grid(lambda: x.value)
        channel_dim = _channel_dim(scale)
        if channel_dim is None:
            return self._run(self.deployed(scale, grid), grid, integers)
        # (a QuantConv2d's accumulator: channels along dim 1, requantized channels-last)
        out = self._run(self.deployed(scale.movedim(channel_dim, -1), grid), grid, integers.movedim(channel_dim, -1))
        return IntQuantTensor(out.value.movedim(-1, channel_dim), out.scale, out.zero_point, out.bit_width,
                              out.signed, out.training)

    def deployed(self, in_scale: Tensor, grid: _Grid | None = None) -> M.Requant:
        """The deployed module for an input at ``in_scale`` (per tensor or per channel of the last dim)."""
        return self.requant(_ratio_scale(in_scale), grid or self.grid())


class QuantILayerNorm(_QuantOutput):
    """I-LayerNorm over the last dimension (integer mean, variance and square root; INT16 affine), its
    output requantized to this layer's grid. Parameters ``weight`` / ``bias`` as ``nn.LayerNorm``'s."""

    def __init__(self, normalized_shape: int, eps: float = 1e-6, act_quant=Int8ActPerTensorFloat, **kwargs):
        super().__init__(act_quant, **kwargs)
        self.normalized_shape = (int(normalized_shape),)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(self.normalized_shape))
        self.bias = nn.Parameter(torch.zeros(self.normalized_shape))

    def _float(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def _forward(self, x):
        if not self.quantizing:
            return _value(self.output_quant(self._float(_value(x))))
        integers, scale = _integers(x, self)
        grid = self.grid(lambda: self._float(x.value))
        return self._run(self.deployed(scale, grid), grid, integers)

    def deployed(self, in_scale: Tensor, grid: _Grid | None = None) -> M.LayerNorm:
        attributes = dict(weight=self.weight, bias=self.bias, eps=self.eps, channels=self.normalized_shape[0])
        return _build("layer_norm", None, attributes, (_per_tensor(in_scale, self, "input"),), grid or self.grid())


class QuantGELU(_QuantOutput):
    """An integer GELU of the registry (``variant``: one of ``REGISTRY["gelu"].variants``, None its default),
    output requantized to this layer's grid. Poly-GELU fits its polynomial to the inputs seen under calibration
    mode."""

    def __init__(self, variant: str | None = None, act_quant=Int8ActPerTensorFloat, **kwargs):
        super().__init__(act_quant, **kwargs)
        self.variant = REGISTRY["gelu"].variant(variant)
        self.inputs = IsegObserver(momentum=1.0)  # samples of the input, for the fitted variants
        self._built = None  # (key, deployed module): Poly-GELU's fit takes ~0.2 s, so build once per scales

    def extra_repr(self) -> str:
        return f"variant={self.variant.name}"

    def _forward(self, x):
        if not self.quantizing:
            return _value(self.output_quant(F.gelu(self.inputs(_value(x)))))
        integers, scale = _integers(x, self)
        grid = self.grid(lambda: F.gelu(x.value))
        return self._run(self.deployed(scale, grid), grid, integers)

    def deployed(self, in_scale: Tensor, grid: _Grid | None = None) -> nn.Module:
        scale, grid = _per_tensor(in_scale, self, "input"), grid or self.grid()
        key = (scale, float(grid.scale.detach()), grid.bounds, int(self.inputs.batches))
        if self._built is None or self._built[0] != key:
            self._built = (key, _build("gelu", self.variant.name, dict(samples=self.inputs.samples.float()), (scale,),
                                       grid))
        return self._built[1]


class QuantSoftmax(_Layer):
    """An integer softmax of the registry (``variant``: one of ``REGISTRY["softmax"].variants``, None its default)
    over ``dim``: probabilities as integers in [0, 2**15] at scale 2**-15 (an unsigned 16-bit ``IntQuantTensor``;
    ``QuantMatMul`` takes them)."""

    def __init__(self, variant: str | None = None, dim: int = -1):
        super().__init__()
        self.variant = REGISTRY["softmax"].variant(variant)
        self.dim = dim

    def extra_repr(self) -> str:
        return f"variant={self.variant.name}, dim={self.dim}"

    def _forward(self, x):
        if not isinstance(x, IntQuantTensor):  # calibration mode: the float op
            return torch.softmax(_value(x), self.dim)
        integers, scale = _integers(x, self)
        return self._run(self.deployed(scale), _fixed_grid(PROBABILITY_SCALE, SOFTMAX_BITS, False, x.value), integers)

    def deployed(self, in_scale: Tensor) -> nn.Module:
        return _build("softmax", self.variant.name, dict(dim=self.dim), (_per_tensor(in_scale, self, "input"),), None)


class QuantResidualAdd(_QuantOutput):
    """a + b: each operand requantized to this layer's grid (signed, per tensor), summed, saturated. With
    ``constant_bits``, a plain float operand is a constant the model computes from its parameters (a position
    embedding): it is quantized on a symmetric per-tensor grid of that width over its own range, as the FX
    lowering quantizes constants (otherwise a float operand is refused)."""

    def __init__(self, act_quant=Int16ActPerTensorFloat, constant_bits: int | None = None, **kwargs):
        super().__init__(act_quant, **kwargs)
        self.constant_bits = constant_bits

    def _operand(self, x) -> tuple[Tensor, Tensor]:
        if self.constant_bits is None or isinstance(x, QuantTensor):
            return _integers(x, self)
        integers, scale = intops.quantize_constant(x, self.constant_bits)
        return integers.to(x.dtype), scale.to(x.dtype)

    def _forward(self, a, b):
        if not self.quantizing:
            return _value(self.output_quant(_value(a) + _value(b)))
        (ia, sa), (ib, sb) = self._operand(a), self._operand(b)
        grid = self.grid(lambda: _value(a) + _value(b))
        return self._run(self.deployed(sa, sb, grid), grid, ia, ib)

    def deployed(self, scale_a: Tensor, scale_b: Tensor, grid: _Grid | None = None) -> M.Add:
        grid = grid or self.grid()
        if not grid.signed or grid.bounds != intops.int_range(int(grid.bit_width)):
            raise ValueError("QuantResidualAdd's act_quant must be signed and not narrow-range")
        scales = (_per_tensor(scale_a, self, "operand"), _per_tensor(scale_b, self, "operand"))
        return _build("add", None, dict(alpha=1), scales, grid)


class QuantMatMul(_QuantOutput):
    """``alpha * (a @ b)`` of two quantized activations (INT8 x INT8, or ``QuantSoftmax`` probabilities x INT8):
    an exact integer product, requantized to this layer's grid (``alpha``, e.g. attention's 1/sqrt(d), is
    taken by the requantization)."""

    def __init__(self, act_quant=Int8ActPerTensorFloat, alpha: float = 1.0, **kwargs):
        super().__init__(act_quant, **kwargs)
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        self.alpha = float(alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"

    def _forward(self, a, b):
        if not self.quantizing:
            return _value(self.output_quant(torch.matmul(_value(a), _value(b)) * self.alpha))
        (ia, sa), (ib, sb) = _integers(a, self), _integers(b, self)
        probabilities = Grid.of(float(sa), intops.int_range(int(a.bit_width), signed=bool(a.signed))).kind == PROBABILITIES
        for name, t, ok in (("a", a, probabilities or (a.signed and int(a.bit_width) <= 8)),
                            ("b", b, b.signed and int(b.bit_width) <= 8)):
            if not ok:
                raise ValueError(f"QuantMatMul's operand {name} must be signed INT8 (or, for a, QuantSoftmax "
                                 f"probabilities), got {'signed' if t.signed else 'unsigned'} {int(t.bit_width)} bits")
        grid = self.grid(lambda: torch.matmul(a.value, b.value) * self.alpha)
        return self._run(self.deployed(sa, sb, probabilities, grid), grid, ia, ib)

    def deployed(self, scale_a: Tensor, scale_b: Tensor, probabilities: bool, grid: _Grid | None = None) -> M.MatMul:
        a = Grid.probabilities() if probabilities else Grid.of(_per_tensor(scale_a, self, "operand"), (-128, 127))
        b = Grid.of(_per_tensor(scale_b, self, "operand"), (-128, 127))
        return _build("matmul", None, dict(alpha=self.alpha), (a, b), grid or self.grid())


class QuantMul(_QuantOutput):
    """``a * b`` of two quantized activations (quick-GELU's ``x * sigmoid(1.702 x)``, gates): the exact integer
    product, requantized to this layer's grid."""

    def __init__(self, act_quant=Int16ActPerTensorFloat, **kwargs):
        super().__init__(act_quant, **kwargs)

    def _forward(self, a, b):
        if not self.quantizing:
            return _value(self.output_quant(_value(a) * _value(b)))
        (ia, sa), (ib, sb) = _integers(a, self), _integers(b, self)
        grid = self.grid(lambda: a.value * b.value)
        return self._run(self.deployed(sa, sb, grid), grid, ia, ib)

    def deployed(self, scale_a: Tensor, scale_b: Tensor, grid: _Grid | None = None) -> M.Mul:
        scales = (_per_tensor(scale_a, self, "operand"), _per_tensor(scale_b, self, "operand"))
        return _build("mul", None, {}, scales, grid or self.grid())


class QuantL2Norm(_QuantOutput):
    """``F.normalize(x, dim=dim)`` over the last dimension (``dim`` -1 or the last index): integer L2
    normalisation (15 fraction bits), its output requantized to this layer's grid."""

    def __init__(self, dim: int = -1, act_quant=Int16ActPerTensorFloat, **kwargs):
        super().__init__(act_quant, **kwargs)
        self.dim = dim

    def _check_dim(self, x: Tensor) -> Tensor:
        if self.dim not in (-1, x.dim() - 1):
            raise ValueError(f"integer L2 normalisation is over the last dimension; got dim={self.dim} for a "
                             f"{x.dim()}-d input")
        return x

    def _forward(self, x):
        if not self.quantizing:
            return _value(self.output_quant(F.normalize(self._check_dim(_value(x)), dim=-1)))
        integers, scale = _integers(x, self)
        grid = self.grid(lambda: F.normalize(self._check_dim(x.value), dim=-1))
        return self._run(self.deployed(scale, grid), grid, self._check_dim(integers))

    def deployed(self, in_scale: Tensor, grid: _Grid | None = None) -> M.L2Norm:
        return _build("l2_normalize", None, dict(p=2, dim=self.dim), (_per_tensor(in_scale, self, "input"),),
                      grid or self.grid())


class QuantMean(_QuantOutput):
    """``x.mean(dim, keepdim)``: an integer sum, requantized by ``S_in / (n S_out)``."""

    def __init__(self, dim, keepdim: bool = False, act_quant=Int16ActPerTensorFloat, **kwargs):
        super().__init__(act_quant, **kwargs)
        self.dim, self.keepdim = dim, bool(keepdim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, keepdim={self.keepdim}"

    def _forward(self, x):
        if not self.quantizing:
            return _value(self.output_quant(_value(x).mean(self.dim, keepdim=self.keepdim)))
        integers, scale = _integers(x, self)
        grid = self.grid(lambda: x.value.mean(self.dim, keepdim=self.keepdim))
        return self._run(self.deployed(scale, reduced_count(x.value.shape, self.dim), grid), grid, integers)

    def deployed(self, in_scale: Tensor, count: int, grid: _Grid | None = None) -> M.Mean:
        attributes = dict(dim=self.dim, keepdim=self.keepdim, count=count)
        return _build("mean", None, attributes, (_per_tensor(in_scale, self, "input"),), grid or self.grid())


class QuantCat(_QuantOutput):
    """``torch.cat(parts, dim)`` at this layer's grid: each quantized part requantized to it (unless it is already
    on it), float constant parts (a cls token) quantized to it."""

    def __init__(self, dim: int = 0, act_quant=Int16ActPerTensorFloat, **kwargs):
        super().__init__(act_quant, **kwargs)
        self.dim = dim

    def extra_repr(self) -> str:
        return f"dim={self.dim}"

    def _forward(self, *parts):
        if not self.quantizing:
            return _value(self.output_quant(torch.cat([_value(p) for p in parts], self.dim)))
        grid = self.grid(lambda: torch.cat([_value(p) for p in parts], self.dim))
        scale = float(grid.scale.detach())
        integers, scales = [], []
        for p in parts:
            if isinstance(p, IntQuantTensor):
                i, s = _integers(p, self)
                integers.append(i)
                scales.append((float(s), intops.int_range(int(p.bit_width), signed=bool(p.signed))))
            else:  # a constant: on the output grid directly
                integers.append(intops.quantize_constant(p, grid.bounds, scale)[0].to(p.dtype))
                scales.append(None)
        return self._run(self.deployed(scales, grid), grid, *integers)

    def deployed(self, parts: list, grid: _Grid | None = None) -> M.Cat:
        """``parts``: (scale, integer bounds) of each quantized part, None for a constant one (already on the grid)."""
        return _build("cat", None, dict(dim=self.dim), tuple(None if p is None else Grid.of(*p) for p in parts),
                      grid or self.grid())


class QuantScalarMul(_Layer):
    """``x * factor`` (or ``x / factor`` with ``divide``) for a positive number: the integers stay, the scale
    changes (no integer op; attention's ``* d**-0.5``). The factor is fixed here or given to ``forward`` (a
    number the model computes from shapes, such as ``sqrt(x.shape[-1])``)."""

    def __init__(self, factor: float | None = None, divide: bool = False):
        super().__init__()
        self.factor, self.divide = factor, divide

    def extra_repr(self) -> str:
        return f"factor={self.factor}, divide={self.divide}"

    def multiplier(self, factor: float | None = None) -> float:
        factor = self.factor if factor is None else factor
        if factor is None or not float(factor) > 0:
            raise ValueError(f"QuantScalarMul takes a positive factor, got {factor}")
        return 1.0 / float(factor) if self.divide else float(factor)

    def _forward(self, x, factor: float | None = None):
        c = self.multiplier(factor)
        if not isinstance(x, IntQuantTensor):  # calibration mode: the float op
            return _value(x) * c
        return IntQuantTensor(x.value * c, x.scale * c, x.zero_point, x.bit_width, x.signed, self.training)


class QuantUpsample(_Layer):
    """Nearest or integer bilinear (``align_corners`` as F.interpolate's) resize of (B, C, H, W) to ``size`` or by
    ``scale_factor`` (or to a ``size`` given to ``forward``: one the model computes from shapes); the grid is
    the input's (bilinear rounds its exact rational weights)."""

    def __init__(self, size=None, scale_factor=None, mode: str = "nearest", align_corners: bool = False):
        super().__init__()
        if mode not in ("nearest", "bilinear"):
            raise ValueError(f"integer upsampling is nearest or bilinear, got mode={mode!r}")
        if size is not None and scale_factor is not None:
            raise ValueError("give one of size and scale_factor")
        self.size, self.scale_factor, self.mode = size, scale_factor, mode
        self.align_corners = bool(align_corners) and mode == "bilinear"

    def _size(self, x: Tensor, size=None) -> tuple[int, int]:
        size = self.size if size is None else size
        if size is not None:
            return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if self.scale_factor is None:
            raise ValueError("QuantUpsample needs a size or a scale_factor")
        return int(x.shape[-2] * self.scale_factor), int(x.shape[-1] * self.scale_factor)

    def _forward(self, x, size=None):
        if not isinstance(x, IntQuantTensor):  # calibration mode: the float op
            x = _value(x)
            return F.interpolate(x, self._size(x, size), mode=self.mode,
                                 align_corners=self.align_corners if self.mode == "bilinear" else None)
        integers, _ = _integers(x, self)
        signed = bool(x.signed)
        grid = _Grid(x.scale, x.bit_width, signed, intops.int_range(int(x.bit_width), signed=signed))
        return self._run(self.deployed(self._size(x.value, size)), grid, integers)

    def deployed(self, size: tuple[int, int]) -> M.Upsample:
        attributes = dict(mode=self.mode, align_corners=self.align_corners, out_size=size)
        return _build("interpolate", None, attributes, (1.0,), None)


class QuantRegistryOp(_Layer):
    """A registry entry whose output stays on its input's grid (``observation="share"``: clamp, max pooling), as a
    Brevitas layer made from the entry alone: the entry's float op while Brevitas calibrates, its deployed module
    (the entry's ``build`` for the input's grid, shape and ``attributes``) on the integers. The swap uses it for
    every such entry that has no layer of its own."""

    def __init__(self, entry: str, attributes: dict):
        super().__init__()
        self.entry = REGISTRY[entry].name
        self.attributes = dict(attributes)

    def extra_repr(self) -> str:
        return f"{self.entry}, {self.attributes}"

    def _forward(self, x):
        if not isinstance(x, IntQuantTensor):  # calibration mode: the float op
            return REGISTRY[self.entry].float_op(self.attributes, _value(x))
        integers, scale = _integers(x, self)
        signed = bool(x.signed)
        grid = _Grid(x.scale, x.bit_width, signed, intops.int_range(int(x.bit_width), signed=signed))
        return self._run(self.deployed(scale, grid.bounds, tuple(x.value.shape)), grid, integers)

    def deployed(self, in_scale: Tensor, bounds: tuple[int, int], input_shape: tuple[int, ...]) -> nn.Module:
        attributes = dict(self.attributes, input_shape=input_shape)
        return _build(self.entry, None, attributes, (Grid.of(_per_tensor(in_scale, self, "input"), bounds),), None)


class QuantRequantizedOp(_QuantOutput):
    """A registry entry with an output grid of its own (``observation="output"``: sigmoid, SiLU, hardswish, average
    pooling), as a Brevitas layer made from the entry alone: the float op while Brevitas calibrates (its output
    observed by ``act_quant``), the entry's deployed module for the input's scale and shape and this layer's grid
    on the integers."""

    def __init__(self, entry: str, attributes: dict, act_quant=Int8ActPerTensorFloat, **kwargs):
        super().__init__(act_quant, **kwargs)
        self.entry = REGISTRY[entry].name
        self.attributes = dict(attributes)

    def extra_repr(self) -> str:
        return f"{self.entry}, {self.attributes}"

    def _float(self, x: Tensor) -> Tensor:
        return REGISTRY[self.entry].float_op(self.attributes, x)

    def _forward(self, x):
        if not self.quantizing:
            return _value(self.output_quant(self._float(_value(x))))
        integers, scale = _integers(x, self)
        grid = self.grid(lambda: self._float(x.value))
        return self._run(self.deployed(scale, tuple(x.value.shape), grid), grid, integers)

    def deployed(self, in_scale: Tensor, input_shape: tuple[int, ...], grid: _Grid | None = None) -> nn.Module:
        attributes = dict(self.attributes, input_shape=input_shape)
        return _build(self.entry, None, attributes, (_per_tensor(in_scale, self, "input"),), grid or self.grid())

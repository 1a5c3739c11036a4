"""torch.ao configs built from the operator registry: one BackendPatternConfig per float op.

* :func:`get_iseg_backend_config`: every module, function and tensor method of every registry entry
  with its own output observer is a pattern (shape ops are not: see below).
  ``add`` / ``mul`` / ``div`` observe only their tensor arguments (a Python number is no tensor).
* :func:`get_iseg_qconfig_mapping`: :class:`~iseg_plugin.ops.IsegObserver` for every activation
  (ranges; the integer widths are decided at lowering) and torch.ao's per-channel INT8 observer
  for weights; the GELU and softmax qconfigs name the registry variant, so
  ``.set_module_name(...)`` / ``.set_object_type(...)`` choose it per layer or per op type.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import FakeQuantize, MinMaxObserver, PerChannelMinMaxObserver, QConfig, QConfigMapping
from torch.ao.quantization.backend_config import BackendConfig, BackendPatternConfig, DTypeConfig, ObservationType

import torch.ao.quantization.backend_config.utils  # noqa: F401 - torch 2.13's lazy import (ecosystem B4)
import torch.ao.nn.qat as nnqat
import torch.ao.nn.quantized.reference as nnqr
from ..ops import REGISTRY, IsegObserver
from ..ops.entries import WEIGHT_BITS

_DTYPES = DTypeConfig(input_dtype=torch.qint8, output_dtype=torch.qint8, weight_dtype=torch.qint8,
                      bias_dtype=torch.float)
_WEIGHTED = {nn.Linear: (nnqat.Linear, nnqr.Linear), nn.Conv2d: (nnqat.Conv2d, nnqr.Conv2d)}
_SCALAR_OPS = ("add", "mul", "div")  # x + c, x * c: only the tensor argument is observed


def get_iseg_backend_config() -> BackendConfig:
    config = BackendConfig("iseg")
    for entry in REGISTRY:
        # Shape ops get no pattern: a shared observer would be called once per shape op and move its
        # range several times per batch. The lowering carries scales through them; an op after one gets
        # an input observer from prepare_fx (the same values, observed once).
        if entry.observation != "output":
            continue
        observation = ObservationType.OUTPUT_USE_DIFFERENT_OBSERVER_AS_INPUT
        for target in entry.targets():
            pattern = BackendPatternConfig(target).add_dtype_config(_DTYPES).set_observation_type(observation)
            if target in _WEIGHTED:
                qat, reference = _WEIGHTED[target]
                pattern.set_root_module(target).set_qat_module(qat).set_reference_quantized_module(reference)
                # prepare_qat_fx matches patterns after swapping in the QAT module: that one too
                config.set_backend_pattern_config(
                    BackendPatternConfig(qat).add_dtype_config(_DTYPES).set_observation_type(observation)
                    .set_root_module(target).set_reference_quantized_module(reference))
            if target in (F.linear, F.conv2d, F.conv_transpose2d):  # (their weights are no activations)
                pattern._set_input_type_to_index({"weight": 1, "bias": 2})
            if entry.name in _SCALAR_OPS:
                pattern._set_num_tensor_args_to_observation_type({n: observation for n in (0, 1, 2)})
            config.set_backend_pattern_config(pattern)
    return config


WEIGHT_OBSERVER = PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
TENSOR_WEIGHT_OBSERVER = MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)


def _activation(momentum: float | None, variant: str | None, qat: bool, symmetric: bool = False, weight_bits: int = 8):
    options = dict(momentum=momentum, variant=variant, symmetric=symmetric, weight_bits=weight_bits)
    if qat:
        return FakeQuantize.with_args(observer=IsegObserver, **options, quant_min=-128, quant_max=127,
                                      dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    return IsegObserver.with_args(**options)


def get_iseg_qconfig_mapping(gelu: str | None = None, softmax: str | None = None, momentum: float | None = None,
                             qat: bool = False, gelu_grid: str = "asymmetric", weight_bits: int = 8) -> QConfigMapping:
    """The plugin's qconfig for every supported op; ``gelu`` / ``softmax`` name registry variants
    (an unknown name is an error listing the known ones). ``momentum``: the observers' range rule (None: the
    extremes of every calibration value; a number: an EMA with that update weight, e.g. 0.01 for QAT).
    ``gelu_grid``: "asymmetric" (GELU's INT8 output
    on 256 levels over its one-sided range) or "symmetric" (as the Brevitas swap makes it).
    ``weight_bits``: 8 (W8A8) or 4 (W4A8: per-channel INT4 weights) for every Linear / Conv2d; a
    layer's own width is ``.set_module_name(name, ...)`` of a qconfig from :func:`iseg_qconfig`, or the
    per-layer selection of :mod:`iseg_plugin.select`."""
    if gelu_grid not in ("asymmetric", "symmetric"):
        raise ValueError(f"gelu_grid is 'asymmetric' or 'symmetric', got {gelu_grid!r}")
    variants = {"gelu": REGISTRY["gelu"].variant(gelu).name, "softmax": REGISTRY["softmax"].variant(softmax).name}
    mapping = QConfigMapping().set_global(iseg_qconfig(momentum=momentum, qat=qat))
    for name, variant in variants.items():
        qconfig = iseg_qconfig(momentum, variant, qat, symmetric=name == "gelu" and gelu_grid == "symmetric")
        for target in REGISTRY[name].targets():
            mapping.set_object_type(target, qconfig)
    for name in ("linear", "conv2d"):
        for target in REGISTRY[name].targets():
            mapping.set_object_type(target, iseg_qconfig(momentum, qat=qat, weight_bits=weight_bits))
    # torch.ao refuses a per-channel weight observer on ConvTranspose modules; weight observers are nominal here (the
    # lowering quantizes every weight per output channel itself)
    for target in REGISTRY["conv_transpose2d"].targets():
        mapping.set_object_type(target, iseg_qconfig(momentum, qat=qat)._replace(weight=TENSOR_WEIGHT_OBSERVER))
    return mapping


def iseg_qconfig(momentum: float | None = None, variant: str | None = None, qat: bool = False, symmetric: bool = False,
                 weight_bits: int = 8) -> QConfig:
    """One op's qconfig: its output observer with the op's choices (registry ``variant``, GEMM ``weight_bits``)."""
    if weight_bits not in WEIGHT_BITS:
        raise ValueError(f"weight_bits must be one of {WEIGHT_BITS}, got {weight_bits!r}")
    return QConfig(activation=_activation(momentum, variant, qat, symmetric, weight_bits), weight=WEIGHT_OBSERVER)

"""The pattern table and everything torch.ao derives from it: backend config, qconfig mapping, custom configs.

Each pattern is a float module class of the plugin, the observed module ``prepare_fx`` swaps in,
and the integer-only module ``convert_fx`` swaps in. The patterns are whole modules (encoder,
decoder, classifier head): torch.ao's custom-module API swaps modules, not single ops, and inside
them every Linear, matmul, softmax, GELU, LayerNorm, residual add, embedding and upsampling runs
as the deployed model's integer module (``IntLinear``, ``IntAttention``, ``IntSoftmax``, ``IntGELU``,
``IntLayerNorm``, ``IntAdd``, ``Requant``, integer upsampling).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.ao.quantization.quantize_fx  # noqa: F401  (torch 2.13: loads backend_config.utils; ecosystem B4)
from torch import nn
from torch.ao.quantization import QConfigMapping
from torch.ao.quantization.backend_config import BackendConfig, BackendPatternConfig, DTypeConfig, ObservationType
from torch.ao.quantization.fx.custom_config import ConvertCustomConfig, PrepareCustomConfig

from iseg_plugin.models import ISegmenterMaskHead, IVisionTransformer, PooledLinearHead

from .modules import (
    IntEncoder,
    IntMaskHead,
    IntPooledLinearHead,
    ObservedEncoder,
    ObservedMaskHead,
    ObservedPooledHead,
)
from .qconfig import get_iseg_qconfig, is_iseg_qconfig


class Pattern(NamedTuple):
    float_module: type
    observed: type
    integer: type
    what: str


PATTERNS = (
    Pattern(IVisionTransformer, ObservedEncoder, IntEncoder,
            "ViT encoder: patch embedding, cls/position embeddings, blocks, final I-LayerNorm"),
    Pattern(ISegmenterMaskHead, ObservedMaskHead, IntMaskHead,
            "Mask Transformer decoder: blocks, L2 norm, masks, mask I-LayerNorm, upsampling"),
    Pattern(PooledLinearHead, ObservedPooledHead, IntPooledLinearHead, "classifier head: max pooling, Linear"),
)
FLOAT_MODULES = tuple(p.float_module for p in PATTERNS)

# quint8 at every pattern boundary: see .qconfig for why (no float op appears at convert).
_DTYPES = DTypeConfig(input_dtype=torch.quint8, output_dtype=torch.quint8, weight_dtype=torch.qint8,
                      bias_dtype=torch.int32)


def get_iseg_backend_config() -> BackendConfig:
    """torch.ao's BackendConfig for the integer Segmenter: one entry per pattern module."""
    config = BackendConfig("iseg")
    for pattern in PATTERNS:
        config.set_backend_pattern_config(
            BackendPatternConfig(pattern.float_module)
            .set_observation_type(ObservationType.OUTPUT_USE_DIFFERENT_OBSERVER_AS_INPUT)
            .add_dtype_config(_DTYPES)
        )
    return config


def get_iseg_qconfig_mapping(momentum: float = 0.05, **options) -> QConfigMapping:
    """The plugin's qconfig on every pattern module and none elsewhere (``options``: the GELU
    variant, bit widths, mean/std, see :func:`fx_patterns.get_iseg_qconfig`)."""
    qconfig = get_iseg_qconfig(momentum, **options)
    mapping = QConfigMapping().set_global(None)
    for cls in FLOAT_MODULES:
        mapping.set_object_type(cls, qconfig)
    return mapping


def get_iseg_prepare_custom_config() -> PrepareCustomConfig:
    """Float -> observed module swaps; the graph input is uint8 pixels (already quantized)."""
    config = PrepareCustomConfig().set_input_quantized_indexes([0]).set_output_quantized_indexes([0])
    for pattern in PATTERNS:
        config.set_float_to_observed_mapping(pattern.float_module, pattern.observed)
    return config


def get_iseg_convert_custom_config() -> ConvertCustomConfig:
    """Observed -> integer-only module swaps."""
    config = ConvertCustomConfig()
    for pattern in PATTERNS:
        config.set_observed_to_quantized_mapping(pattern.observed, pattern.integer)
    return config


class UnsupportedQConfigError(ValueError):
    """A qconfig asks torch.ao to quantize something the iseg backend config has no pattern for."""


def _supported() -> str:
    return ", ".join(cls.__name__ for cls in FLOAT_MODULES)


def check_qconfig_mapping(model: nn.Module, mapping: QConfigMapping) -> None:
    """Refuse qconfigs that torch.ao would apply outside the plugin's patterns, or a foreign qconfig
    on a pattern. (torch.ao does not check custom modules against the backend config itself.)"""
    if mapping.global_qconfig is not None:
        raise UnsupportedQConfigError(
            "a global qconfig would quantize every op through torch.ao's own lowering, which the iseg backend "
            f"config does not have; set_global(None) and give qconfigs to the pattern modules only ({_supported()})"
        )
    named = dict(model.named_modules())
    entries = [(f"object type {getattr(k, '__name__', k)}", k if isinstance(k, type) else None, q)
               for k, q in mapping.object_type_qconfigs.items()]
    entries += [(f"module '{name}'", type(named[name]) if name in named else None, q)
                for name, q in mapping.module_name_qconfigs.items()]
    entries += [(f"module regex '{rx}'", None, q) for rx, q in mapping.module_name_regex_qconfigs.items()]
    for what, cls, qconfig in entries:
        if qconfig is None:
            continue
        if cls not in FLOAT_MODULES:
            raise UnsupportedQConfigError(
                f"the iseg backend config has no pattern for {what}; its patterns are {_supported()}: "
                "set this qconfig to None (that part stays float) or use one of them"
            )
        if not is_iseg_qconfig(qconfig):
            raise UnsupportedQConfigError(
                f"{what} needs the plugin's qconfig (fx_patterns.get_iseg_qconfig / get_iseg_qconfig_mapping), "
                f"got {qconfig}: torch.ao's quantized tensors have no INT16 for the residual stream"
            )

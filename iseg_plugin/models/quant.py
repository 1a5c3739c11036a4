"""The quantized I-Segmenter: the float encoder and decoder with their layers swapped for quant layers.

Bit map (I-Segmenter §3.2, I-ViT): INT8 per-channel weights, INT32 bias, INT8 activations into
every GEMM, INT16 residual stream and INT16 embeddings (cls token, position and class embeddings),
Shiftmax with 16-bit output, lambda-ShiftGELU (or ShiftGELU / Poly-GELU), I-LayerNorm; no dropout
or drop-path. One change: the attention logits entering the softmax are INT16 (``scores_bits``),
not INT8. The softmax is no GEMM, so nothing needs them at 8 bits, and at 8 bits ShiftExp's shifts
work on coarse integers: on CamVid with DINOv2-S/14 (S=1) pixel agreement with FP32 goes from 93.7 %
to 96.8 % and the first block's output SQNR from 14.9 to 22.8 dB with INT16 logits. Also, GELU's
INT8 output uses an asymmetric grid (``gelu_out_asymmetric``): it is >= -0.17, so a symmetric grid
wastes half its levels; fc2 takes it back to int8 through its bias, at no run-time cost (agreement
97.8 -> 98.2 % in the same setting with Poly-GELU). Decoder options: integer L2 norm, nearest or integer bilinear upsampling.

The parameter names are the float model's, so FP32 checkpoints (plugin or stock mmseg) load into
the quantized model; the range observers are extra buffers that calibration fills.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from mmengine.model import ModuleList
from torch import nn

from ..quant.act import QTensor, QuantAct, QuantAdd, QuantCat, QuantInput
from ..quant.layers import (
    GELU_VARIANTS,
    SOFTMAX_VARIANTS,
    QuantConv2d,
    QuantGELU,
    QuantLayerNorm,
    QuantLinear,
    QuantSoftmax,
    int_matmul,
    l2_normalize,
    upsample,
)
from .head import ISegmenterMaskHead
from .vit import Attention, IVisionTransformer, Mlp, TransformerBlock


@dataclass(frozen=True)
class QuantConfig:
    """What the integer model uses for its non-linear operators (the config's ``quant=dict(...)``)."""

    gelu: str = "lambda-shift"
    lam: float = 6.0
    softmax: str = "shift"
    softmax_bits: int = 16
    scores_bits: int = 16  # attention logits into the softmax (8 reproduces the paper)
    gelu_out_asymmetric: bool = True  # INT8 GELU output on [min, max] (False reproduces the paper)

    def __post_init__(self):
        if self.gelu not in GELU_VARIANTS:
            raise ValueError(f"quant.gelu must be one of {GELU_VARIANTS}, got {self.gelu!r}")
        if self.softmax not in SOFTMAX_VARIANTS:
            raise ValueError(f"quant.softmax must be one of {SOFTMAX_VARIANTS}, got {self.softmax!r}")


def _no_stochastic_layers(name: str, rates: dict) -> None:
    active = {k: v for k, v in rates.items() if v}
    if active:
        raise ValueError(f"the integer-only {name} has no dropout or drop-path; set {active} to 0")


class QuantAttention(nn.Module):
    def __init__(self, attn: Attention, cfg: QuantConfig):
        super().__init__()
        self.num_heads, self.head_dims, self.scale = attn.num_heads, attn.head_dims, attn.scale
        self.qkv = QuantLinear.from_float(attn.qkv)
        self.qkv_act = QuantAct(8)  # one scale for q, k and v
        self.scores_act = QuantAct(cfg.scores_bits)
        self.softmax = QuantSoftmax(cfg.softmax, cfg.softmax_bits)
        self.context_act = QuantAct(8)
        self.proj = QuantLinear.from_float(attn.proj)

    def forward(self, x: QTensor) -> QTensor:
        qkv = self.qkv_act(self.qkv(x))
        heads = qkv.value.unflatten(-1, (3, self.num_heads, self.head_dims)).permute(2, 0, 3, 1, 4)
        q, k, v = heads[0], heads[1], heads[2]
        scores = int_matmul(self, QTensor(q, qkv.scale), k.transpose(-2, -1), qkv.scale, self.scale)
        probs = self.softmax(self.scores_act(scores))
        context = int_matmul(self, probs, v, qkv.scale)
        context = self.context_act(QTensor(context.value.transpose(1, 2).flatten(2), context.scale))
        return self.proj(context)


class QuantMlp(nn.Module):
    def __init__(self, mlp: Mlp, cfg: QuantConfig):
        super().__init__()
        self.fc1 = QuantLinear.from_float(mlp.fc1)
        self.fc1_act = QuantAct(8)
        self.act = QuantGELU(cfg.gelu, cfg.lam)
        self.act_out = QuantAct(8, asymmetric=cfg.gelu_out_asymmetric)
        self.fc2 = QuantLinear.from_float(mlp.fc2)

    def forward(self, x: QTensor) -> QTensor:
        return self.fc2(self.act_out(self.act(self.fc1_act(self.fc1(x)))))


class QuantBlock(nn.Module):
    """Pre-norm block on the INT16 residual stream."""

    def __init__(self, block: TransformerBlock, cfg: QuantConfig):
        super().__init__()
        self.norm1 = QuantLayerNorm(block.norm1)
        self.attn = QuantAttention(block.attn, cfg)
        self.add1 = QuantAdd(16)
        self.norm2 = QuantLayerNorm(block.norm2)
        self.mlp = QuantMlp(block.mlp, cfg)
        self.add2 = QuantAdd(16)

    def forward(self, x: QTensor) -> QTensor:
        x = self.add1(x, self.attn(self.norm1(x)))
        return self.add2(x, self.mlp(self.norm2(x)))


def _quantized_copy(cls, float_cls: type, module: nn.Module, quant: dict | None):
    """A deep copy of the float ``module`` turned into its quantized subclass ``cls`` (same weights)."""
    if not isinstance(module, float_cls) or any(isinstance(m, QuantAct) for m in module.modules()):
        raise TypeError(f"{cls.__name__}.from_float needs a float {float_cls.__name__}, got {type(module).__name__}")
    quantized = copy.deepcopy(module)
    quantized.__class__ = cls
    quantized._quantize(QuantConfig(**(quant or {})))
    return quantized


def _tokens(x: QTensor) -> QTensor:
    return QTensor(x.value.flatten(2).transpose(1, 2), x.scale)


class IQuantVisionTransformer(IVisionTransformer):
    """The integer encoder: ``IVisionTransformer``'s arguments plus ``quant=dict(...)`` (QuantConfig).

    Takes the normalised float image (quantized to INT8 on entry from its uint8 pixels, see
    :class:`QuantInput`; ``ISegmenter`` gives it the data preprocessor's mean and std) and returns
    a tuple with one :class:`QTensor` of INT8 features (B, C, h, w).
    """

    def __init__(self, quant: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        _no_stochastic_layers("encoder", {k: kwargs.get(k, 0.0) for k in ("drop_rate", "attn_drop_rate",
                                                                          "drop_path_rate")})
        self._quantize(QuantConfig(**(quant or {})))

    @classmethod
    def from_float(cls, encoder: IVisionTransformer, quant: dict | None = None) -> "IQuantVisionTransformer":
        """The quantized copy of a built float encoder (its weights; dropout and drop-path left out);
        the float module is left as it is. The torch.ao FX front end builds its observed encoder so."""
        return _quantized_copy(cls, IVisionTransformer, encoder, quant)

    def _quantize(self, cfg: QuantConfig) -> None:
        if not self.final_norm:
            raise ValueError("the integer encoder needs final_norm=True (its INT8 output comes from I-LayerNorm)")
        self.input_quant = QuantInput()
        self.patch_embed.projection = QuantConv2d.from_float(self.patch_embed.projection)
        self.cls_cat = QuantCat(16, embedding_first=True)
        self.pos_quant = QuantAct(16)
        self.pos_add = QuantAdd(16)
        self.layers = ModuleList(QuantBlock(block, cfg) for block in self.layers)
        self.norm = QuantLayerNorm(self.norm, out_bits=8)

    def forward(self, inputs: torch.Tensor) -> tuple[QTensor, ...]:
        x = self.input_quant(self.patch_embed.pad(inputs))  # pad value 0 = the mean pixel, as mmseg pads
        x = self.patch_embed.projection(x)
        grid_h, grid_w = x.value.shape[-2], x.value.shape[-1]
        tokens = _tokens(x)
        x = self.cls_cat(tokens, self.cls_token.expand(tokens.value.shape[0], -1, -1))
        x = self.pos_add(x, self.pos_quant(self.pos_embed_for(grid_h, grid_w)))
        return self.encode(x, lambda q: QTensor(q.value[:, 1:].transpose(1, 2).unflatten(2, (grid_h, grid_w)), q.scale))


class IQuantSegmenterMaskHead(ISegmenterMaskHead):
    """The integer Mask Transformer: ``ISegmenterMaskHead``'s arguments plus ``quant=dict(...)``.

    ``forward`` returns float logits (integers times their scale) for mmseg's losses and
    predictions; :meth:`forward_quant` returns the integer logits as a :class:`QTensor`.
    """

    def __init__(self, quant: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        _no_stochastic_layers("decoder", {k: kwargs.get(k, 0.1 if k == "drop_path_rate" else 0.0)
                                          for k in ("drop_rate", "attn_drop_rate", "drop_path_rate")})
        self._quantize(QuantConfig(**(quant or {})))

    @classmethod
    def from_float(cls, head: ISegmenterMaskHead, quant: dict | None = None) -> "IQuantSegmenterMaskHead":
        """The quantized copy of a built float decoder (see :meth:`IQuantVisionTransformer.from_float`)."""
        return _quantized_copy(cls, ISegmenterMaskHead, head, quant)

    def _quantize(self, cfg: QuantConfig) -> None:
        self.dec_proj = QuantLinear.from_float(self.dec_proj)
        self.cls_cat = QuantCat(16, embedding_first=False)
        self.layers = ModuleList(QuantBlock(block, cfg) for block in self.layers)
        self.decoder_norm = QuantLayerNorm(self.decoder_norm, out_bits=8)
        self.patch_proj = QuantLinear.from_float(self.patch_proj)
        self.classes_proj = QuantLinear.from_float(self.classes_proj)
        self.patch_act = QuantAct(8)
        self.classes_act = QuantAct(8)
        if self.l2_norm:
            self.patch_l2_act = QuantAct(8)
            self.classes_l2_act = QuantAct(8)
        self.masks_act = QuantAct(16)
        self.mask_norm = QuantLayerNorm(self.mask_norm, out_bits=16)

    def forward_quant(self, inputs) -> QTensor:
        x = self._transform_inputs(inputs)
        grid_h, grid_w = x.value.shape[-2], x.value.shape[-1]
        tokens = self.dec_proj(_tokens(x))
        x = self.cls_cat(tokens, self.cls_emb.expand(tokens.value.shape[0], -1, -1))
        for layer in self.layers:
            x = layer(x)
        x = self.decoder_norm(x)
        k = self.num_classes
        patches = self.patch_act(self.patch_proj(QTensor(x.value[:, :-k], x.scale)))
        classes = self.classes_act(self.classes_proj(QTensor(x.value[:, -k:], x.scale)))
        if self.l2_norm:
            patches = self.patch_l2_act(l2_normalize(patches))
            classes = self.classes_l2_act(l2_normalize(classes))
        masks = self.masks_act(int_matmul(self, patches, classes.value.transpose(1, 2), classes.scale))
        masks = self.mask_norm(masks)
        masks = QTensor(masks.value.transpose(1, 2).unflatten(2, (grid_h, grid_w)), masks.scale)
        return upsample(masks, self.upsample_factor, self.upsample)

    def forward(self, inputs) -> torch.Tensor:
        return self.forward_quant(inputs).dequantize().float()

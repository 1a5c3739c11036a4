"""The one conversion step: a calibrated quantized ``ISegmenter`` -> :class:`DeployedSegmenter`.

Integer constants are computed by the quantized layers' own methods (``requant_params``,
``int_weight``, ``int_bias``, ``layernorm_params``, ...) from the very scale tensors the quantized
model uses in its forward, recorded by running it once. So the deployed model computes the same
integers as the fake-quant model, by construction (tests check it to the bit).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import intops
from ..models.quant import IQuantSegmenterMaskHead, IQuantVisionTransformer, QuantBlock
from ..quant.act import NotCalibratedError, QTensor, QuantAct, observers, set_observing
from ..quant.layers import QuantConv2d, QuantGELU, QuantLayerNorm, QuantLinear, QuantSoftmax
from .modules import IntAdd, IntAttention, IntBlock, IntGELU, IntLayerNorm, IntLinear, IntMlp, IntSoftmax, Requant
from .segmenter import DeployedDecoder, DeployedEncoder, DeployedSegmenter

_RECORDED = (QuantAct, QuantLinear, QuantConv2d, QuantGELU, QuantSoftmax, QuantLayerNorm)


class _Scales:
    """The input scales every quant layer saw in one forward."""

    def __init__(self, model: nn.Module, images: Tensor):
        self.seen: dict[nn.Module, list[Tensor | None]] = {}
        hooks = [m.register_forward_pre_hook(self._hook) for m in model.modules() if isinstance(m, _RECORDED)]
        try:
            with torch.no_grad():
                model._forward(images)
        finally:
            for h in hooks:
                h.remove()

    def _hook(self, module, args):
        self.seen[module] = [a.scale if isinstance(a, QTensor) else None for a in args]

    def __call__(self, module: nn.Module, i: int = 0) -> Tensor:
        return self.seen[module][i]


def _requant(act: QuantAct, in_scale: Tensor) -> Requant:
    return Requant(act.requant_params(in_scale), act.bounds())


def _linear(layer, in_scale: Tensor, input_act: QuantAct | None = None) -> IntLinear:
    """The integer GEMM; ``input_act`` is the quantizer of its input when that may be asymmetric."""
    w, w_scale = layer.int_weight()
    bias = layer.int_bias(in_scale * w_scale)
    offset = input_act.bounds()[0] + 128 if input_act is not None and input_act.asymmetric else 0
    return IntLinear(w.detach().reshape(w.shape[0], -1).to(torch.int64),
                     None if bias is None else bias.detach().to(torch.int64), offset)


def _layernorm(norm: QuantLayerNorm, scales: _Scales) -> IntLayerNorm:
    params = intops.layernorm_params(norm.weight, norm.bias)
    eps = intops.layernorm_eps(norm.eps, float(scales(norm)))
    out = norm.out.requant_params(torch.tensor(params.out_scale, dtype=torch.float32))
    return IntLayerNorm(params.weight.detach().to(torch.int64), params.bias.detach().to(torch.int64), eps, out,
                        norm.out.bits)


def _gelu(gelu: QuantGELU, in_scale: Tensor) -> IntGELU:
    s = float(in_scale)
    if gelu.variant == "lambda-shift":
        return IntGELU(gelu.variant, intops.lambda_shift_gelu_params(s, gelu.lam)._asdict())
    if gelu.variant == "shift":
        return IntGELU(gelu.variant, {"i0": intops.exp_i0(s)})
    a, b = gelu.poly_ab.tolist()
    params = intops.poly_gelu_params(a, b, s)
    return IntGELU(gelu.variant, {"clip": params.clip, "pre_shift": params.pre_shift, "i0": params.i0}, params.poly)


def _softmax(softmax: QuantSoftmax, in_scale: Tensor) -> IntSoftmax:
    s = float(in_scale)
    if softmax.variant == "shift":
        return IntSoftmax("shift", softmax.bits, i0=intops.exp_i0(s))
    return IntSoftmax("bit-exp", softmax.bits, bit_exp=intops.bit_exp_params(s))


def _block(block: QuantBlock, scales: _Scales) -> IntBlock:
    a, m = block.attn, block.mlp
    attn = IntAttention(a.num_heads, _linear(a.qkv, scales(a.qkv)), _requant(a.qkv_act, scales(a.qkv_act)),
                        _requant(a.scores_act, scales(a.scores_act)), _softmax(a.softmax, scales(a.softmax)),
                        _requant(a.context_act, scales(a.context_act)), _linear(a.proj, scales(a.proj)))
    mlp = IntMlp(_linear(m.fc1, scales(m.fc1)), _requant(m.fc1_act, scales(m.fc1_act)), _gelu(m.act, scales(m.act)),
                 _requant(m.act_out, scales(m.act_out)), _linear(m.fc2, scales(m.fc2), m.act_out))

    def add(q):
        return IntAdd(q.requant_params(scales(q, 0)), q.requant_params(scales(q, 1)), q.bits)

    return IntBlock(_layernorm(block.norm1, scales), attn, add(block.add1), _layernorm(block.norm2, scales), mlp,
                    add(block.add2))


def _encoder(enc: IQuantVisionTransformer, scales: _Scales, grid: tuple[int, int]) -> DeployedEncoder:
    mean_fixed, pixel_scale = enc.input_quant.pixel_params()
    conv = enc.patch_embed.projection
    with torch.no_grad():
        cls_token = intops.quantize(enc.cls_token, enc.cls_cat.scale(), 16)
        pos = intops.quantize(enc.pos_embed_for(*grid), enc.pos_quant.scale(), 16)
    pad_pixel = torch.round(enc.input_quant.mean).to(torch.int64)  # what mmseg's zero padding means in pixels
    return DeployedEncoder(
        enc.patch_size, mean_fixed, pad_pixel, pixel_scale, _linear(conv, scales(conv)), _requant(enc.cls_cat, scales(enc.cls_cat)),
        cls_token.to(torch.int64), pos.to(torch.int64),
        IntAdd(enc.pos_add.requant_params(scales(enc.pos_add, 0)), enc.pos_add.requant_params(scales(enc.pos_add, 1))),
        [_block(b, scales) for b in enc.layers], _layernorm(enc.norm, scales))


def _decoder(head: IQuantSegmenterMaskHead, scales: _Scales) -> DeployedDecoder:
    with torch.no_grad():
        cls_emb = intops.quantize(head.cls_emb, head.cls_cat.scale(), 16)
    l2 = None
    if head.l2_norm:
        l2 = (_requant(head.patch_l2_act, scales(head.patch_l2_act)),
              _requant(head.classes_l2_act, scales(head.classes_l2_act)))
    return DeployedDecoder(
        head.num_classes, _linear(head.dec_proj, scales(head.dec_proj)), _requant(head.cls_cat, scales(head.cls_cat)),
        cls_emb.to(torch.int64), [_block(b, scales) for b in head.layers], _layernorm(head.decoder_norm, scales),
        _linear(head.patch_proj, scales(head.patch_proj)), _requant(head.patch_act, scales(head.patch_act)),
        _linear(head.classes_proj, scales(head.classes_proj)), _requant(head.classes_act, scales(head.classes_act)),
        l2, _requant(head.masks_act, scales(head.masks_act)), _layernorm(head.mask_norm, scales), head.upsample,
        head.upsample_factor)


def convert(model: nn.Module, input_size: tuple[int, int]) -> DeployedSegmenter:
    """Deploy a calibrated quantized ``ISegmenter`` for (H, W) inputs (uint8, RGB)."""
    enc, head = model.backbone, model.decode_head
    if not isinstance(enc, IQuantVisionTransformer) or not isinstance(head, IQuantSegmenterMaskHead):
        raise TypeError("convert() needs a quantized ISegmenter (built with quant=dict(...)) that was calibrated")
    model.eval()
    if not all(bool(m.calibrated) for m in observers(model)):
        raise NotCalibratedError("convert() needs a calibrated model: run calibration (iseg ptq / CalibrationHook) first")
    set_observing(model, False)  # the probe forward below must not move any range
    p = enc.patch_size
    grid = (-(-input_size[0] // p), -(-input_size[1] // p))
    probe = torch.zeros(1, 3, grid[0] * p, grid[1] * p)  # one forward only to read the scales
    scales = _Scales(model, probe)
    arch = dict(num_classes=head.num_classes, patch_size=p, l2_norm=head.l2_norm, upsample=head.upsample,
                upsample_factor=head.upsample_factor, input_size=list(input_size))
    return DeployedSegmenter(_encoder(enc, scales, grid), _decoder(head, scales), input_size, arch)

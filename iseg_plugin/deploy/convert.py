"""The one conversion step: a calibrated quantized ``ISegmenter`` -> :class:`DeployedSegmenter`.

Integer constants are computed by the quantized layers' own methods (``requant_params``,
``int_weight``, ``int_bias``, ``layernorm_params``, ...) from the very scale tensors the quantized
model uses in its forward, recorded by running it once. So the deployed model computes the same
integers as the fake-quant model, by construction (tests check it to the bit).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from .. import intops
from ..models.quant import IQuantSegmenterMaskHead, IQuantVisionTransformer, QuantBlock
from ..quant.act import NotCalibratedError, QTensor, QuantAct, observers, set_observing
from ..quant.layers import QuantConv2d, QuantGELU, QuantLayerNorm, QuantLinear, QuantSoftmax
from .modules import IntAdd, IntAttention, IntBlock, IntGELU, IntLayerNorm, IntLinear, IntMlp, IntSoftmax, Requant
from .segmenter import DeployedDecoder, DeployedEncoder, DeployedSegmenter, patch_grid

_RECORDED = (QuantAct, QuantLinear, QuantConv2d, QuantGELU, QuantSoftmax, QuantLayerNorm)


class Scales:
    """The input scales every quant layer of ``model`` saw while ``run()`` ran (one forward)."""

    def __init__(self, model: nn.Module, run: Callable[[], object]):
        self.seen: dict[nn.Module, list[Tensor | None]] = {}
        hooks = [m.register_forward_pre_hook(self._hook) for m in model.modules() if isinstance(m, _RECORDED)]
        try:
            with torch.no_grad():
                run()
        finally:
            for h in hooks:
                h.remove()

    def _hook(self, module, args):
        self.seen[module] = [a.scale if isinstance(a, QTensor) else None for a in args]

    def __call__(self, module: nn.Module, i: int = 0) -> Tensor:
        return self.seen[module][i]


def requant_from(act: QuantAct, in_scale: Tensor) -> Requant:
    return Requant(act.requant_params(in_scale), act.bounds())


def int_linear_from(layer, in_scale: Tensor, input_act: QuantAct | None = None) -> IntLinear:
    """The integer GEMM; ``input_act`` is the quantizer of its input when that may be asymmetric."""
    w, w_scale = layer.int_weight()
    bias = layer.int_bias(in_scale * w_scale)
    offset = input_act.bounds()[0] + 128 if input_act is not None and input_act.asymmetric else 0
    return IntLinear(w.detach().reshape(w.shape[0], -1).to(torch.int64),
                     None if bias is None else bias.detach().to(torch.int64), offset)


def _layernorm(norm: QuantLayerNorm, scales: Scales) -> IntLayerNorm:
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


def _block(block: QuantBlock, scales: Scales) -> IntBlock:
    a, m = block.attn, block.mlp
    attn = IntAttention(a.num_heads, int_linear_from(a.qkv, scales(a.qkv)), requant_from(a.qkv_act, scales(a.qkv_act)),
                        requant_from(a.scores_act, scales(a.scores_act)), _softmax(a.softmax, scales(a.softmax)),
                        requant_from(a.context_act, scales(a.context_act)), int_linear_from(a.proj, scales(a.proj)))
    mlp = IntMlp(int_linear_from(m.fc1, scales(m.fc1)), requant_from(m.fc1_act, scales(m.fc1_act)), _gelu(m.act, scales(m.act)),
                 requant_from(m.act_out, scales(m.act_out)), int_linear_from(m.fc2, scales(m.fc2), m.act_out))

    def add(q):
        return IntAdd(q.requant_params(scales(q, 0)), q.requant_params(scales(q, 1)), q.bits)

    return IntBlock(_layernorm(block.norm1, scales), attn, add(block.add1), _layernorm(block.norm2, scales), mlp,
                    add(block.add2))


def deploy_encoder(enc: IQuantVisionTransformer, scales: Scales, grid: tuple[int, int]) -> DeployedEncoder:
    mean_fixed, pixel_scale = enc.input_quant.pixel_params()
    conv = enc.patch_embed.projection
    with torch.no_grad():
        cls_token = intops.quantize(enc.cls_token, enc.cls_cat.scale(), 16)
        pos = intops.quantize(enc.pos_embed_for(*grid), enc.pos_quant.scale(), 16)
    pad_pixel = torch.round(enc.input_quant.mean).to(torch.int64)  # what mmseg's zero padding means in pixels
    return DeployedEncoder(
        enc.patch_size, mean_fixed, pad_pixel, pixel_scale, int_linear_from(conv, scales(conv)), requant_from(enc.cls_cat, scales(enc.cls_cat)),
        cls_token.to(torch.int64), pos.to(torch.int64),
        IntAdd(enc.pos_add.requant_params(scales(enc.pos_add, 0)), enc.pos_add.requant_params(scales(enc.pos_add, 1))),
        [_block(b, scales) for b in enc.layers], _layernorm(enc.norm, scales))


def deploy_decoder(head: IQuantSegmenterMaskHead, scales: Scales) -> DeployedDecoder:
    with torch.no_grad():
        cls_emb = intops.quantize(head.cls_emb, head.cls_cat.scale(), 16)
    l2 = None
    if head.l2_norm:
        l2 = (requant_from(head.patch_l2_act, scales(head.patch_l2_act)),
              requant_from(head.classes_l2_act, scales(head.classes_l2_act)))
    return DeployedDecoder(
        head.num_classes, int_linear_from(head.dec_proj, scales(head.dec_proj)), requant_from(head.cls_cat, scales(head.cls_cat)),
        cls_emb.to(torch.int64), [_block(b, scales) for b in head.layers], _layernorm(head.decoder_norm, scales),
        int_linear_from(head.patch_proj, scales(head.patch_proj)), requant_from(head.patch_act, scales(head.patch_act)),
        int_linear_from(head.classes_proj, scales(head.classes_proj)), requant_from(head.classes_act, scales(head.classes_act)),
        l2, requant_from(head.masks_act, scales(head.masks_act)), _layernorm(head.mask_norm, scales), head.upsample,
        head.upsample_factor)


def freeze_calibrated(model: nn.Module) -> None:
    """Eval mode, ranges frozen; a model with an uncalibrated quantizer is refused."""
    model.eval()
    if not all(bool(m.calibrated) for m in observers(model)):
        raise NotCalibratedError("converting needs a calibrated model: run calibration (iseg ptq / CalibrationHook, "
                                 "or the prepared FX model on a few images) first")
    set_observing(model, False)  # the probe forward must not move any range


def convert(model: nn.Module, input_size: tuple[int, int]) -> DeployedSegmenter:
    """Deploy a calibrated quantized ``ISegmenter`` for (H, W) inputs (uint8, RGB)."""
    enc, head = model.backbone, model.decode_head
    if not isinstance(enc, IQuantVisionTransformer) or not isinstance(head, IQuantSegmenterMaskHead):
        raise TypeError("convert() needs a quantized ISegmenter (built with quant=dict(...)) that was calibrated")
    freeze_calibrated(model)
    grid = patch_grid(enc.patch_size, input_size)
    probe = torch.zeros(1, 3, grid[0] * enc.patch_size, grid[1] * enc.patch_size)  # one forward only to read the scales
    scales = Scales(model, lambda: model._forward(probe))
    arch = dict(num_classes=head.num_classes, patch_size=enc.patch_size, l2_norm=head.l2_norm, upsample=head.upsample,
                upsample_factor=head.upsample_factor, input_size=list(input_size))
    return DeployedSegmenter(deploy_encoder(enc, scales, grid), deploy_decoder(head, scales), input_size, arch)

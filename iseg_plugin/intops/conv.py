"""Integer convolutions of any geometry: kernel, stride, padding (numbers, ``"valid"``, ``"same"``), dilation, groups
(depthwise included), and transposed convolutions; the reference arithmetic for the convolutions issue 39's
families use beyond the patch embedding (SegFormer's overlapping patch embeddings and Mix-FFN depthwise conv, conv
necks and heads, DPT's / BEiT's FPN upsamplers).

* **conv2d_acc**: the accumulators ``acc[n, o, i, j] = bias[o] + sum_{c, u, v} w[o, c, u, v] *
  xpad[n, g(o) C/g + c, i s_h + u d_h, j s_w + v d_w]``, computed exactly in int64 as one batched integer GEMM
  over the ``kh * kw`` shifted views of the padded input (im2col). The input is padded with ``pad_value``: the
  integer of real 0 (its zero point; 0 for a symmetric grid), so padding adds exactly what the float convolution's
  zeros add. Widths: INT8 inputs and weights and ``K = C/g * kh * kw`` terms keep ``|acc| <= K * 128 * 128 +
  |bias|``, an INT32 accumulator for ``K < 2**17`` (the integer GEMM of a deployed kernel); the function itself is
  exact in int64 for any ``|acc| < 2**63``.
* **conv_transpose2d_acc**: the transposed convolution (the gradient of conv2d with respect to its input) as a
  convolution: the input spread out by the stride (``s - 1`` zeros between entries, which must be the integer of
  real 0: a zero point of 0), padded by ``d (k - 1) - p`` (negative: cropped) plus ``output_padding`` at the end,
  convolved at stride 1 with the spatially flipped kernel whose in / out channels are swapped per group. Exact.
* **conv2d**: ``conv2d_acc`` followed by one per-output-channel dyadic requantization (``requantize`` on dim 1),
  clamped to ``bits``: ``round_half_up(acc * S_x S_w[o] / S_out)``.

No rounding happens in the accumulators: ``conv2d_acc`` of integers equals ``F.conv2d`` of the same integers held
in float64 (tested on every geometry). Integer tensors (any width) give int64; floats holding integers (QAT) give
the same integers with the float convolution's gradient (:func:`._bridge.run_integer`), w.r.t. input, weight and
bias.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._bridge import as_int64, run_integer
from .dyadic import Dyadic, requantize


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    v = tuple(int(t) for t in v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def same_padding(kernel: Sequence[int], dilation: Sequence[int]) -> tuple[int, int, int, int]:
    """PyTorch's ``padding="same"`` (stride 1): ``d (k - 1)`` in all per axis, the odd one at the end.
    Returns F.pad's ``(left, right, top, bottom)``."""
    (kh, kw), (dh, dw) = _pair(kernel), _pair(dilation)
    th, tw = dh * (kh - 1), dw * (kw - 1)
    return tw // 2, tw - tw // 2, th // 2, th - th // 2


def _padding(padding, kernel, stride, dilation) -> tuple[int, int, int, int]:
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0, 0, 0
        if padding == "same":
            if _pair(stride) != (1, 1):
                raise ValueError("padding='same' needs stride 1 (as in PyTorch)")
            return same_padding(kernel, dilation)
        raise ValueError(f"padding must be a number, a pair, 'valid' or 'same', got {padding!r}")
    ph, pw = _pair(padding)
    if ph < 0 or pw < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    return pw, pw, ph, ph


def conv_padding(padding, kernel, stride, dilation) -> tuple[int, int, int, int]:
    """A Conv2d's ``padding`` (number, pair, ``"valid"``, ``"same"``) as F.pad's ``(left, right, top, bottom)``."""
    return _padding(padding, kernel, _pair(stride), _pair(dilation))


def columns(x: Tensor, kernel, stride, pads: tuple[int, int, int, int], dilation, pad_value: int = 0) -> Tensor:
    """im2col: the ``kh * kw`` shifted views of the padded input, (N, C, kh * kw, OH, OW), in ``x``'s dtype (exact
    for any integer type: the deployed kernel runs it on int8). Each column's (c, u, v) order is the weight's."""
    if any(pads):
        x = F.pad(x, pads, value=pad_value)
    (kh, kw), (sh, sw), (dh, dw) = _pair(kernel), _pair(stride), _pair(dilation)
    hp, wp = x.shape[-2:]
    oh, ow = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"the kernel ({kh}, {kw}) with dilation {dilation} is larger than the padded input {(hp, wp)}")
    views = [x[:, :, u * dh: u * dh + sh * (oh - 1) + 1: sh, v * dw: v * dw + sw * (ow - 1) + 1: sw]
             for u in range(kh) for v in range(kw)]  # kh * kw views (N, C, OH, OW)
    return torch.stack(views, 2)


def _conv_int(x: Tensor, w: Tensor, bias: Tensor | None, stride: tuple[int, int], pads: tuple[int, int, int, int],
              dilation: tuple[int, int], groups: int, pad_value: int) -> Tensor:
    x, w = as_int64(x), as_int64(w)
    n, c, _, _ = x.shape
    o, cg, kh, kw = w.shape
    if c != cg * groups or o % groups:
        raise ValueError(f"conv of {c} input channels, weight {tuple(w.shape)} and {groups} groups do not match")
    cols = columns(x, (kh, kw), stride, pads, dilation, pad_value)
    oh, ow = cols.shape[-2:]
    cols = cols.reshape(n, groups, cg * kh * kw, oh * ow)
    acc = torch.matmul(w.reshape(groups, o // groups, cg * kh * kw), cols)  # (N, G, O/G, OH*OW), exact in int64
    acc = acc.reshape(n, o, oh, ow)
    if bias is not None:
        acc = acc + as_int64(bias).view(1, o, 1, 1)
    return acc


def conv2d_acc(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1, groups: int = 1,
               pad_value: int = 0) -> Tensor:
    """Integer 2-D convolution accumulators (``F.conv2d``'s arguments; module docstring).

    * input ``x``: (N, C, H, W) integers (INT8 in a deployed model) with zero point ``pad_value``;
    * ``weight``: (O, C / groups, kh, kw) integers (INT8, symmetric per output channel); ``bias``: (O,) integers at
      scale ``S_x * S_w[o]`` (INT32) or None;
    * output: (N, O, OH, OW) accumulators at scale ``S_x * S_w[o]``, exact (int64; INT32 for ``K < 2**17`` INT8
      terms); sizes as ``F.conv2d``'s.
    """
    stride, dilation = _pair(stride), _pair(dilation)
    pads = _padding(padding, weight.shape[-2:], stride, dilation)

    def surrogate(xf: Tensor, wf: Tensor, *bf: Tensor) -> Tensor:
        xf = F.pad(xf, pads, value=float(pad_value)) if any(pads) else xf
        return F.conv2d(xf, wf.to(xf.dtype), bf[0].to(xf.dtype) if bf else None, stride, 0, dilation, groups)

    def int_fn(xi: Tensor, wi: Tensor, *bi: Tensor) -> Tensor:
        return _conv_int(xi, wi, bi[0] if bi else None, stride, pads, dilation, groups, int(pad_value))

    inputs = (x, weight) if bias is None else (x, weight, bias)
    return run_integer(int_fn, inputs, surrogate)


def transposed_as_conv(x: Tensor, w: Tensor, stride, padding, output_padding, groups: int, dilation) -> tuple[Tensor, Tensor]:
    """A transposed convolution as the stride-1 convolution (``dilation``, no padding) of the input spread out by the
    stride and padded, with the flipped kernel whose in / out channels are swapped per group: (input, weight), in
    the input's and the weight's dtypes (reshapes and pads only, so the deployed kernel runs it on int8 and traces)."""
    n, c, h, wd = x.shape
    cin, og, kh, kw = w.shape
    if cin != c or c % groups:
        raise ValueError(f"conv_transpose of {c} input channels, weight {tuple(w.shape)} and {groups} groups do not match")
    (sh, sw), (ph, pw), (oph, opw), (dh, dw) = stride, padding, output_padding, dilation
    if oph >= max(sh, dh) or opw >= max(sw, dw):
        raise ValueError(f"output_padding {output_padding} must be smaller than the stride or the dilation")
    # s - 1 zeros after each entry (the last ones cropped): (N, C, H, 1, W, 1) padded to (N, C, H, sh, W, sw)
    spread = F.pad(x.reshape(n, c, h, 1, wd, 1), (0, sw - 1, 0, 0, 0, sh - 1)).reshape(n, c, h * sh, wd * sw)
    eh, ew = dh * (kh - 1) - ph, dw * (kw - 1) - pw  # may be < 0: F.pad crops
    spread = F.pad(spread, (ew, ew + opw - (sw - 1), eh, eh + oph - (sh - 1)))
    # (C_in, O/G, kh, kw) -> (O, C_in/G, kh, kw), flipped: a convolution's weight
    flipped = w.flip(-2, -1).reshape(groups, cin // groups, og, kh, kw).transpose(1, 2).reshape(groups * og, cin // groups, kh, kw)
    return spread, flipped


def _conv_transpose_int(x: Tensor, w: Tensor, bias: Tensor | None, stride, padding, output_padding, groups, dilation):
    spread, flipped = transposed_as_conv(as_int64(x), as_int64(w), stride, padding, output_padding, groups, dilation)
    return _conv_int(spread, flipped, bias, (1, 1), (0, 0, 0, 0), dilation, groups, 0)


def conv_transpose2d_acc(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, output_padding=0,
                         groups: int = 1, dilation=1) -> Tensor:
    """Integer 2-D transposed convolution accumulators (``F.conv_transpose2d``'s arguments; module docstring).

    * input ``x``: (N, C_in, H, W) integers with zero point 0 (the spread-out zeros must be real 0);
    * ``weight``: (C_in, O / groups, kh, kw) integers; ``bias``: (O,) at scale ``S_x * S_w[o]`` or None;
    * output: (N, O, (H - 1) s - 2 p + d (k - 1) + output_padding + 1, ...) accumulators, exact (int64). Each
      output sums at most ``C_in / groups * ceil(kh / s_h) * ceil(kw / s_w)`` products: INT8 operands keep it
      within INT32.
    """
    stride, padding, output_padding, dilation = _pair(stride), _pair(padding), _pair(output_padding), _pair(dilation)

    def surrogate(xf: Tensor, wf: Tensor, *bf: Tensor) -> Tensor:
        return F.conv_transpose2d(xf, wf.to(xf.dtype), bf[0].to(xf.dtype) if bf else None, stride, padding,
                                  output_padding, groups, dilation)

    def int_fn(xi: Tensor, wi: Tensor, *bi: Tensor) -> Tensor:
        return _conv_transpose_int(xi, wi, bi[0] if bi else None, stride, padding, output_padding, groups, dilation)

    inputs = (x, weight) if bias is None else (x, weight, bias)
    return run_integer(int_fn, inputs, surrogate)


def requantize_channels(acc: Tensor, dyadic: Dyadic, bits: int | tuple[int, int] | None = 8, dim: int = 1) -> Tensor:
    """:func:`~.dyadic.requantize` with the per-channel dyadic along ``dim`` (1: NCHW) instead of the last dim."""
    if dyadic.multiplier.dim() == 0:
        return requantize(acc, dyadic, bits)
    return requantize(acc.movedim(dim, -1), dyadic, bits).movedim(-1, dim)


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, requant: Dyadic, bits: int | tuple[int, int] | None = 8,
           stride=1, padding=0, dilation=1, groups: int = 1, pad_value: int = 0) -> Tensor:
    """Integer convolution: :func:`conv2d_acc`, then ``round_half_up(acc * S_x S_w[o] / S_out)`` per output channel
    (``requant``: scalar or (O,) dyadics, ``dyadic_from_ratio(S_x * S_w / S_out)``), clamped to ``bits``."""
    acc = conv2d_acc(x, weight, bias, stride, padding, dilation, groups, pad_value)
    return requantize_channels(acc, requant, bits)


__all__ = ["conv2d_acc", "conv_transpose2d_acc", "conv2d", "requantize_channels", "same_padding", "conv_padding",
           "columns", "transposed_as_conv"]

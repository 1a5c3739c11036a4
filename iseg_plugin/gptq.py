"""GPTQ rounding of narrow (INT4) GEMM weights: a post-training calibration of the weights' integers.

Rounding each weight to its nearest level (RTN) leaves every column's error where it falls; GPTQ
(Frantar et al., 2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers") rounds the columns one at a time and moves each column's error onto the columns not yet
rounded, weighted by the inverse of the layer's input Gram matrix ``H = X^T X`` (the calibration
inputs), which minimises ``||X W^T - X Q^T||^2`` far better than RTN at 4 bits. torch.ao, torchao's
PT2E flow and Brevitas 0.13 offer GPTQ only for their own quantized modules (Brevitas: ``gptq_mode``
over its ``QuantLinear``), not for weights that the plugin's lowering quantizes, hence this version.

The scales are chosen first (per channel, the activation-aware clip search of
:func:`intops.weight_scale` with ``diag(H)`` as the input energy) and stay fixed; columns go in order
of decreasing ``diag(H)`` ("act order"); ``H`` is damped by 1 % of its mean diagonal. The result, the
integers and their scales, is stored in the observer of the layer's output (``weight_int``,
``weight_scale``), where the lowering takes it instead of rounding the float weight; calibration
records and checkpoints carry it. QAT rounds every narrow weight with GPTQ at its calibration too: a
frozen one (e.g. a frozen encoder's) keeps the integers, as in PTQ; a weight that trains is set to them
(integers times scales) and keeps only the scales (``weight_scale`` without ``weight_int``), so QAT starts
from the PTQ model and its integers then follow the float weight, rounded to nearest on GPTQ's scales (a
clip search at each step would choose other scales, off GPTQ's grid). A Conv2d is the GEMM of its im2col
columns and is rounded the same way (per group: a group's output channels read its columns only). Each layer's
inputs come from the float model (not from the layers rounded before it, as in GPTQ's sequential form).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from . import intops
from .intops.conv import columns
from .ops import REGISTRY
from .sites import GEMMS, Probe, sites

DAMPING = 0.01


def gptq_quantize(weight: Tensor, hessian: Tensor, bits: int, damping: float = DAMPING) -> tuple[Tensor, Tensor]:
    """GPTQ integers (float64 tensor holding them, ``weight``'s shape (out, in)) and per-channel scales of a
    Linear weight, from the Gram matrix ``hessian`` (in, in) of its calibration inputs."""
    w = weight.detach().double().flatten(1).clone()
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0  # inputs that never vary: their columns cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    scale = intops.weight_scale(w, bits, torch.diagonal(h) / max(float(torch.diagonal(h).mean()), 1e-30))
    order = torch.argsort(torch.diagonal(h), descending=True)
    w, h = w[:, order], h[order][:, order]
    h += damping * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    # the upper Cholesky factor of H^-1: row i holds how the error of column i spreads onto columns > i
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    lo, hi = intops.int_range(bits)
    q = torch.empty_like(w)
    for i in range(w.shape[1]):
        q[:, i] = torch.clamp(torch.round(w[:, i] / scale), lo, hi)
        err = (w[:, i] - q[:, i] * scale) / u[i, i]
        w[:, i + 1:] -= err[:, None] * u[i, i + 1:][None, :]
    restored = torch.empty_like(q)
    restored[:, order] = q
    return restored, scale


class _Call:
    """An op's call as its registry entry's ``attributes`` reads it (``OpCall``), from its run-time arguments."""

    def __init__(self, module, target, args, kwargs):
        self.module, self.target = module, None if module is not None else target
        self.args, self.kwargs = args, kwargs

    def arg(self, i: int, name: str | None = None, default=None):
        return self.args[i] if i < len(self.args) else self.kwargs.get(name, default)

    def input_shape(self, i: int = 0) -> tuple[int, ...]:
        return tuple(self.args[i].shape)


def _gemm_rows(x: Tensor, a: dict) -> Tensor:
    """The rows a GEMM's weight multiplies, (groups, rows, K): a Linear's inputs; a convolution's im2col columns per
    group, (c, kh, kw) as ``weight.flatten(1)`` (a patch embedding's are its patches)."""
    if a["weight"].dim() == 2:
        return x.flatten(0, -2)[None]
    pads = intops.conv_padding(a["padding"], a["kernel"], a["stride"], a["dilation"])
    x = F.pad(x, pads, mode="constant" if a["padding_mode"] == "zeros" else a["padding_mode"])
    cols = columns(x, a["kernel"], a["stride"], (0, 0, 0, 0), a["dilation"])  # (N, C, kh kw, OH, OW)
    n, c, k, oh, ow = cols.shape
    g = a["groups"]
    return cols.reshape(n, g, c // g * k, oh * ow).permute(1, 0, 3, 2).reshape(g, n * oh * ow, c // g * k)


def gptq(prepared: fx.GraphModule, inputs: list[tuple], for_training: bool = False) -> int:
    """GPTQ for every Linear / Conv2d of a calibrated prepared graph whose weights are narrower than 8 bits (its
    output observer's ``weight_bits``), on the float model's inputs to it over ``inputs``; the integers and scales
    are stored in that observer. ``for_training`` (before QAT): a weight that trains is set to its integers times
    its scales instead, and its observer keeps the scales only. Returns the number of layers rounded."""
    found = [s for s in sites(prepared, GEMMS) if s.observer.weight_bits < 8]
    if not found:
        return 0
    grams, weights = {}, {}

    def tap(site):
        module = prepared.get_submodule(site.node.target) if site.node.op == "call_module" else None

        def collect(args, kwargs):
            a = REGISTRY[site.entry].attributes(_Call(module, site.node.target, args, kwargs))
            rows = _gemm_rows(args[0].detach().double(), a)
            grams[site.node] = rows.transpose(1, 2) @ rows + grams.get(site.node, 0.0)  # (groups, K, K)
            weights[site.node] = a["weight"]

        return collect

    taps = {s.node: tap(s) for s in found}
    rounded = 0
    with torch.no_grad():
        for args in inputs:
            Probe(prepared, taps=taps).run(*args)
        for site in found:
            weight, gram = weights[site.node], grams[site.node]
            # one GPTQ per group: a grouped convolution's output channels read their group's columns only
            rounded_groups = [gptq_quantize(w, h, site.observer.weight_bits)
                              for w, h in zip(weight.flatten(1).chunk(gram.shape[0]), gram)]
            q, scale = (torch.cat(t) for t in zip(*rounded_groups))
            site.observer.weight_scale = scale
            if for_training and weight.requires_grad:
                weight.copy_((q * scale[:, None]).reshape(weight.shape))
            else:
                site.observer.weight_int = q.to(torch.int8).reshape(weight.shape[0], -1)
            rounded += 1
    return rounded

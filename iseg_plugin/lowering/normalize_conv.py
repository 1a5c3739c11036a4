"""Graph normalisation before quantization: eval-mode BatchNorm folded into the convolution (or Linear) before it.

The registry has no BatchNorm entry and needs none in inference: a BatchNorm in eval mode is a per-channel affine
map with constant statistics, which folds into the preceding convolution's weight and bias (the float model then
computes the same function, up to float rounding, with one op fewer). Convolution necks and heads (DPT, BEiT /
UPerNet's FPN, SegFormer's decode head, mmseg's ``ConvModule``) are written ``conv -> BatchNorm -> ReLU``.

* **FX** (``prepare_fx``): fold on the ``fx.symbolic_trace`` of the model, then prepare that graph module::

      gm = fold_batch_norm(torch.fx.symbolic_trace(model.eval()))
      prepared = fxp.prepare(gm, example_inputs)

  :func:`fold_batch_norm` uses torch's own pass, ``torch.fx.experimental.optimization.fuse`` (Conv1d/2d/3d +
  BatchNorm1d/2d/3d, Linear + BatchNorm1d, each via ``torch.nn.utils.fusion``), and adds what that pass leaves:
  ConvTranspose1d/2d/3d + BatchNorm (``fuse_conv_bn_eval(..., transpose=True)``; BEiT's and DPT's FPN upsamplers).
* **PT2E**: torchao's ``prepare_pt2e`` already folds ``aten.conv2d`` / ``conv_transpose2d`` + batch norm of an
  exported eval-mode model (``_fuse_conv_bn_``); nothing to do.

A BatchNorm is folded only where its input is a convolution's (or Linear's) output read by nothing else, and it
tracks running statistics; any other BatchNorm stays and the lowering refuses it by node, as before. A model in
training mode is refused: its BatchNorm normalises with batch statistics, which do not fold.
"""
from __future__ import annotations

import copy

from torch import fx, nn
from torch.fx.experimental.optimization import fuse, replace_node_module
from torch.nn.utils.fusion import fuse_conv_bn_eval

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_TRANSPOSED = {nn.ConvTranspose1d: nn.BatchNorm1d, nn.ConvTranspose2d: nn.BatchNorm2d, nn.ConvTranspose3d: nn.BatchNorm3d}


def _producer(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    """The module whose output ``node`` (a BatchNorm call) reads, if that output has no other reader."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    src = node.args[0]
    if src.op != "call_module" or len(src.users) != 1:
        return None
    return modules.get(src.target)


def fold_batch_norm(gm: fx.GraphModule, inplace: bool = False) -> fx.GraphModule:
    """``gm`` with every foldable eval-mode BatchNorm folded into the convolution / Linear before it (module
    docstring); a copy unless ``inplace``. Returns an ``fx.GraphModule`` computing the same function."""
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"fold_batch_norm takes an fx.GraphModule (torch.fx.symbolic_trace(model)), got {type(gm).__name__}")
    training = [name for name, m in gm.named_modules() if isinstance(m, _BATCH_NORMS) and m.training]
    if training:
        raise ValueError(f"BatchNorm {training[0]!r} is in training mode (batch statistics do not fold): call "
                         "model.eval() first")
    if not inplace:
        gm = copy.deepcopy(gm)
    gm = fuse(gm, inplace=True, no_trace=True)  # torch's pass: conv / linear + BatchNorm
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BATCH_NORMS):
            continue
        bn, conv = modules[node.target], _producer(node, modules)
        if conv is None or type(conv) not in _TRANSPOSED or not isinstance(bn, _TRANSPOSED[type(conv)]):
            continue
        if not bn.track_running_stats or conv.training:
            continue
        replace_node_module(node.args[0], modules, fuse_conv_bn_eval(conv, bn, transpose=True))
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm


def remaining_batch_norms(gm: fx.GraphModule) -> list[str]:
    """The BatchNorm modules a graph still calls (not folded: see :func:`fold_batch_norm`)."""
    modules = dict(gm.named_modules())
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules.get(n.target), _BATCH_NORMS)]


__all__ = ["fold_batch_norm", "remaining_batch_norms"]

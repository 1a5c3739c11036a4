"""torchao PT2E, op by op, to the same integer-only model as the torch.ao FX flow.

    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
    import fx_patterns as fxp

    exported = torch.export.export(model.eval(), example_inputs).module()
    prepared = prepare_pt2e(exported, fxp.ISegQuantizer(gelu="poly", softmax="bit-exp"))
    for batch in calibration_batches:
        prepared(batch)
    int_model = fxp.convert(prepared, example_inputs)   # instead of convert_pt2e: the registry's lowering

:class:`ISegQuantizer` annotates every ATen op of the operator registry with an output observer (the
plugin's :class:`~iseg_plugin.ops.IsegObserver`, as in the FX flow), and the model's float inputs.
Before annotating, it rewrites the two forms ``torch.export`` gives ops the registry lowers whole:
``scaled_dot_product_attention`` (``nn.MultiheadAttention``, timm, mmseg, Hugging Face "sdpa") becomes
the exact matmul -> scale -> softmax -> matmul it computes, and ``F.normalize``'s decomposition
(norm, clamp, expand, divide) becomes one ``F.normalize`` call again.
"""
from __future__ import annotations

import functools
import logging
import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..ops.site import NO_LOWERING
from ..ops import REGISTRY, IsegObserver
from ..ops.entries import WEIGHT_BITS
from ..quiet import quiet

# torchao's CPU wheel logs a warning per CUDA library it cannot load, and torch's pytree one per enum
# torchao registers: harmless here, so kept quiet during the import only.
with quiet(logging.getLogger("torchao"), logging.getLogger("torch.utils._pytree"), level=logging.ERROR):
    from torchao.quantization.pt2e.observer import PartialWrapper
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e as _prepare_pt2e
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec, Quantizer

from .api import traceable

aten = torch.ops.aten


def _insert(graph: fx.Graph, like: fx.Node, target, *args) -> fx.Node:
    """A call of ``target`` with ``like``'s source location (for the lowering's messages) and its
    output's fake value (prepare_pt2e observes only nodes whose value is known to be a tensor)."""
    node = graph.call_function(target, args)
    node.meta["stack_trace"] = like.meta.get("stack_trace")
    with like.meta["val"].fake_mode:
        node.meta["val"] = target(*fx.map_arg(args, lambda a: a.meta["val"]))
    return node


def _constant(gm: fx.GraphModule, node: fx.Node):
    """The value of ``node`` if it depends on no input of the model (else None): evaluated from its
    ancestors, which are then parameters, buffers and literals only."""
    ancestors, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n.op == "placeholder" or n.op == "call_module":
            return None
        if n not in ancestors:
            ancestors.add(n)
            todo.extend(n.all_input_nodes)
    env = {}
    for n in gm.graph.nodes:  # in topological order
        if n in ancestors:
            env[n] = operator.attrgetter(n.target)(gm) if n.op == "get_attr" else n.target(
                *fx.map_arg(n.args, env.__getitem__), **fx.map_arg(n.kwargs, env.__getitem__))
    return env[node]


# An additive mask entry at least this large is a masking constant (-inf, finfo.min, -1e4 for padding), not a
# bias: added to the INT16 scores it would set their grid, and the scores would lose their resolution to it.
MASKING_MAGNITUDE = 1e4


def _attention_mask(gm: fx.GraphModule, mask) -> tuple[str, str | None]:
    """How :func:`decompose_attention` takes SDPA's ``attn_mask``: ``("none", None)`` for a mask that masks
    nothing (absent, all True, all zero: Hugging Face passes ``arange >= 0``), ``("add", None)`` for an
    additive float mask computed from parameters and shapes alone (BEiT's relative position bias, Swin's
    window mask), else ``("refuse", why)``."""
    if mask is None:
        return "none", None
    value = _constant(gm, mask) if isinstance(mask, fx.Node) else torch.as_tensor(mask)
    if value is None:
        return "refuse", ("its attn_mask depends on the model's input; only masks computed from parameters and "
                          "shapes (a relative position bias, a window mask) are folded into the integer model")
    value = value.detach()
    if value.dtype == torch.bool:
        if bool(value.all()):
            return "none", None
        return "refuse", ("its boolean attn_mask masks positions out, and the integer softmax has no -inf "
                          "(an additive float mask of finite values is lowered)")
    if bool((value == 0).all()):
        return "none", None
    if not value.is_floating_point():
        return "refuse", f"its attn_mask is {value.dtype}, neither boolean nor an additive float mask"
    largest = float(value.abs().max())
    if not largest < MASKING_MAGNITUDE:  # (also inf and nan)
        return "refuse", (f"its additive attn_mask holds masking constants (largest magnitude {largest:.3g}): added "
                          "to the INT16 scores they would set the scores' grid and leave them no resolution, and "
                          "the integer softmax has no masked form")
    return "add", None


def decompose_attention(gm: fx.GraphModule) -> fx.GraphModule:
    """``scaled_dot_product_attention`` without dropout or causality -> ``softmax(q k^T s [+ mask]) v``.

    Exact: SDPA is defined as this sequence; the integer model needs the probabilities as a value of
    its own to observe and quantize. An additive float mask computed from parameters and shapes alone
    (relative position bias, window mask) becomes an ``add`` of that constant to the scaled scores, as
    eager attention writes it. A call with any other mask, dropout or ``is_causal`` is left as it is
    and refused by the lowering, with its node and the reason (``node.meta[NO_LOWERING]``).
    """
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != aten.scaled_dot_product_attention.default:
            continue
        q, k, v = node.args[:3]
        options = dict(zip(("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"), node.args[3:]))
        options.update(node.kwargs)
        unsupported = [name for name in ("dropout_p", "is_causal", "enable_gqa") if options.get(name)]
        if unsupported:
            node.meta[NO_LOWERING] = (f"its {' and '.join(unsupported)} is not decomposed into integer ops (the "
                                     "integer softmax has no masked form, and dropout is for training)")
            continue
        how, why = _attention_mask(gm, options.get("attn_mask"))
        if how == "refuse":
            node.meta[NO_LOWERING] = why
            continue
        scale = options.get("scale") or 1.0 / math.sqrt(q.meta["val"].shape[-1])
        with graph.inserting_before(node):
            scores = _insert(graph, node, aten.matmul.default, q, _insert(graph, node, aten.transpose.int, k, -2, -1))
            scores = _insert(graph, node, aten.mul.Tensor, scores, scale)
            if how == "add":  # SDPA adds its float mask to the scaled scores
                scores = _insert(graph, node, aten.add.Tensor, scores, options["attn_mask"])
            probs = _insert(graph, node, aten.softmax.int, scores, -1)
            out = _insert(graph, node, aten.matmul.default, probs, v)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _l2_normalize_of(div: fx.Node):
    """(x, dim, eps) if ``div`` ends ``F.normalize(x, 2, dim, eps)`` as torch.export decomposes it."""
    if div.op != "call_function" or div.target != aten.div.Tensor or not isinstance(div.args[1], fx.Node):
        return None
    x, expand = div.args[:2]
    if expand.target != aten.expand_as.default or not isinstance(expand.args[0], fx.Node):
        return None
    clamp = expand.args[0]
    if clamp.target != aten.clamp_min.default or not isinstance(clamp.args[0], fx.Node):
        return None
    norm = clamp.args[0]
    if norm.target != aten.linalg_vector_norm.default or norm.args[0] is not x or norm.args[1] != 2:
        return None
    dims = norm.args[2] if len(norm.args) > 2 else None
    if dims is None or len(dims) != 1:
        return None
    return x, dims[0], clamp.args[1]


def fuse_l2_normalize(gm: fx.GraphModule) -> fx.GraphModule:
    """torch.export's decomposition of ``F.normalize`` -> one ``F.normalize`` call (the registry's entry)."""
    graph = gm.graph
    for node in list(graph.nodes):
        found = _l2_normalize_of(node)
        if found is None:
            continue
        x, dim, eps = found
        with graph.inserting_before(node):
            fused = _insert(graph, node, F.normalize, x, 2.0, dim, eps)
        node.replace_all_uses_with(fused)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    gm.recompile()
    return gm


class ISegQuantizer(Quantizer):
    """The plugin's PT2E quantizer: an :class:`IsegObserver` after every op the registry lowers.

    ``gelu`` / ``softmax`` name registry variants (an unknown name is an error listing the known ones);
    ``momentum`` the observers' range rule (None: every value seen; a number: an EMA weight); ``weight_bits``
    (8 or 4) the width of every GEMM weight.
    Shape ops and splits get no observer of their own (the lowering carries their input's scale through
    them), as in the FX flow.
    """

    def __init__(self, gelu: str | None = None, softmax: str | None = None, momentum: float | None = None,
                 weight_bits: int = 8):
        super().__init__()
        if weight_bits not in WEIGHT_BITS:
            raise ValueError(f"weight_bits must be one of {WEIGHT_BITS}, got {weight_bits!r}")
        self.variants = {"gelu": REGISTRY["gelu"].variant(gelu).name,
                         "softmax": REGISTRY["softmax"].variant(softmax).name}
        self.momentum = momentum
        self.weight_bits = weight_bits

    def _spec(self, variant: str | None, weight_bits: int = 8) -> QuantizationSpec:
        observer = PartialWrapper(functools.partial(IsegObserver, momentum=self.momentum, variant=variant,
                                                    weight_bits=weight_bits))
        # the dtype is nominal, as in the FX flow: each value's width is decided at lowering
        return QuantizationSpec(dtype=torch.int8, observer_or_fake_quant_ctr=observer, quant_min=-128,
                                quant_max=127, qscheme=torch.per_tensor_symmetric)

    def transform_for_annotation(self, model: fx.GraphModule) -> fx.GraphModule:
        return fuse_l2_normalize(decompose_attention(model))

    def annotate(self, model: fx.GraphModule) -> fx.GraphModule:
        for node in model.graph.nodes:
            if node.op == "placeholder":
                value = node.meta.get("val")
                if isinstance(value, torch.Tensor) and value.dtype.is_floating_point:
                    node.meta["quantization_annotation"] = QuantizationAnnotation(
                        output_qspec=self._spec(None), allow_implicit_sharing=False, _annotated=True)
                continue
            entry = REGISTRY.entry_for(node, model)
            if entry is not None and entry.observation == "output":
                gemm = entry.name in ("linear", "conv2d")
                spec = self._spec(self.variants.get(entry.name), self.weight_bits if gemm else 8)
                node.meta["quantization_annotation"] = QuantizationAnnotation(output_qspec=spec, allow_implicit_sharing=False, _annotated=True)
        return model

    def validate(self, model: fx.GraphModule) -> None:
        """Nothing to check before calibration: the lowering refuses what it cannot lower, by node."""


def prepare_pt2e(model: nn.Module, example_inputs: tuple, **options) -> fx.GraphModule:
    """``torch.export`` (an mmseg segmentor: its logits forward) + torchao's ``prepare_pt2e`` with
    :class:`ISegQuantizer(**options) <ISegQuantizer>`. Calibrate the result, then :func:`fx_patterns.convert`."""
    exported = torch.export.export(traceable(model).eval(), tuple(example_inputs)).module(check_guards=False)
    return _prepare_pt2e(exported, ISegQuantizer(**options))

"""Swap a float ViT's modules and functions for the plugin's Brevitas layers, in the spirit of
``brevitas.graph.quantize``.

:func:`quantize` traces the model with torch.fx and rewrites it op by op from the operator registry, the
table the FX lowering reads: ``nn.Linear`` / ``F.linear``, ``nn.Conv2d`` / ``F.conv2d`` and ``nn.ConvTranspose2d`` /
``F.conv_transpose2d`` (any geometry) -> Brevitas' ``QuantLinear`` / ``QuantConv2d`` / ``QuantConvTranspose2d``
(per-channel INT8 weights, ``Int32Bias``) + :class:`DyadicRequant`,
LayerNorm -> :class:`QuantILayerNorm`, GELU -> :class:`QuantGELU`, softmax -> :class:`QuantSoftmax`,
``@`` -> :class:`QuantMatMul`, ``+`` -> :class:`QuantResidualAdd`, ``* c`` / ``/ c`` ->
:class:`QuantScalarMul`, ``cat`` -> :class:`QuantCat`, ``mean`` -> :class:`QuantMean`, ``F.normalize`` ->
:class:`QuantL2Norm`, resize -> :class:`QuantUpsample`, shape ops -> the same call on the integers
(:class:`OnIntegers`); each input gets a ``QuantIdentity``. Values computed from parameters alone (a cls
token, a position embedding resized to the input) stay float ops and enter ``cat`` / ``+`` as constants.

Widths and scales follow the FX lowering: each value is produced at the width its consumers need (INT8
into a GEMM or GELU, INT16 otherwise, :func:`~iseg_plugin.lowering.consumer_bits`), narrowed by a
:class:`DyadicRequant` where one consumer needs fewer bits, and every output grid is the plugin's range
rule (:mod:`.quantizers`). Calibrated with Brevitas' ``calibration_mode`` on the same data as
``prepare_fx`` with ``get_iseg_qconfig_mapping(gelu_grid="symmetric")``, the swapped model in float64
gives the integers of the FX path's deployed model (tested). GELU outputs are symmetric INT8 here:
Brevitas' ``QuantLinear`` carries no input zero point into its accumulator.

An op with no integer lowering is refused with the node named, as by the FX front end; a model torch.fx cannot
trace, with the module (and line) where tracing failed and torch.fx's reason.
"""
import copy
import traceback
from typing import Callable

import torch
from brevitas.nn import QuantConv2d, QuantConvTranspose2d, QuantIdentity, QuantLinear
from brevitas.quant import Int8WeightPerChannelFloat, Int32Bias
from brevitas.quant_tensor import IntQuantTensor, QuantTensor
from torch import Tensor, fx, nn

from ..lowering import LoweringError, consumer_bits, describe, feeds_output, is_shape_query, static_nodes
from ..lowering.normalize_attention import make_traceable, needs_rewrite
from ..lowering.trace import locate_trace_failure
from ..ops.registry import REGISTRY, UnsupportedOpError
from ..ops.site import NodeCall
from .layers import (DyadicRequant, QuantCat, QuantGELU, QuantILayerNorm, QuantL2Norm, QuantMatMul, QuantMean, QuantMul,
                     QuantRegistryOp, QuantRequantizedOp, QuantResidualAdd, QuantScalarMul, QuantSoftmax, QuantUpsample)
from .quantizers import iseg_act_quant


class OnIntegers(nn.Module):
    """A shape op (reshape, permute, indexing, chunk, ...; a function or a tensor method name) on an
    ``IntQuantTensor``: the same call on its value, scale, zero point and width kept. (Brevitas'
    ``IntQuantTensor`` implements only some of these, and indexing it would index its named-tuple fields.)
    On a float tensor (calibration) the op itself."""

    def __init__(self, op: Callable | str):
        super().__init__()
        self.op = op

    def extra_repr(self) -> str:
        return self.op if isinstance(self.op, str) else getattr(self.op, "__name__", repr(self.op))

    def _call(self, *args, **kwargs):
        return getattr(args[0], self.op)(*args[1:], **kwargs) if isinstance(self.op, str) else self.op(*args, **kwargs)

    def forward(self, x, *args, **kwargs):
        if not isinstance(x, QuantTensor):
            return self._call(x, *args, **kwargs)
        if x.scale.numel() != 1:
            raise ValueError(f"a shape op needs a per-tensor scale, got {x.scale.numel()} scales: requantize first")
        out = self._call(x.value, *args, **kwargs)

        def wrap(v: Tensor) -> IntQuantTensor:
            return IntQuantTensor(v, x.scale, x.zero_point, x.bit_width, x.signed, x.training)

        return wrap(out) if isinstance(out, Tensor) else type(out)(wrap(v) for v in out)


def quantize(model: nn.Module, gelu: str | None = None, softmax: str | None = None,
             momentum: float | None = None) -> fx.GraphModule:
    """A copy of the float ``model`` with its ops swapped for Brevitas layers (see the module docstring). Calibrate it
    under ``brevitas.graph.calibrate.calibration_mode``, then run it (eval: integers; train: QAT). ``gelu`` /
    ``softmax`` name registry variants; ``momentum`` is the observers' range rule (None: every calibration value;
    0.01: QAT's EMA)."""
    return _Swap(model, REGISTRY["gelu"].variant(gelu).name, REGISTRY["softmax"].variant(softmax).name,
                 momentum).run()


def _trace(model: nn.Module) -> fx.GraphModule:
    """``fx.symbolic_trace`` of a copy of ``model`` (the user's model stays as it is); a failure is refused naming
    the module torch.fx could not trace and why."""
    model = make_traceable(model) if needs_rewrite(model) else copy.deepcopy(model)  # (torch's attention blocks)
    try:
        return fx.symbolic_trace(model)
    except Exception as err:
        name, module = locate_trace_failure(model) or ("", model)
        frames = [f for f in traceback.extract_tb(err.__traceback__) if "/torch/" not in f.filename]
        where = f" at {frames[-1].filename}:{frames[-1].lineno} ({frames[-1].line})" if frames else ""
        raise LoweringError(
            f"the Brevitas swap cannot trace module '{name or '(root)'}' ({type(module).__name__}) with torch.fx{where}: "
            f"{type(err).__name__}: {err}\nRemove the data-dependent control flow (or Python-level use of traced "
            "values) from its forward, or quantize the model through torch.export, which traces such code: "
            "fx_patterns.prepare_pt2e(model, example_inputs), then fx_patterns.convert") from err


class _Swap:
    def __init__(self, model: nn.Module, gelu: str, softmax: str, momentum: float | None):
        self.gm = _trace(model)
        self.dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        self.graph = self.gm.graph
        self.gelu, self.softmax, self.momentum = gelu, softmax, momentum
        self.static = static_nodes(self.graph)
        entry_of = lambda n: REGISTRY.entry_for(n, self.gm)  # noqa: E731
        self.demand = {n: consumer_bits(n, entry_of, lambda n: False, lambda u: u in self.static)
                       for n in self.graph.nodes if n.op != "output" and n not in self.static}
        # the model's outputs: a grid covering every value calibration saw, as the FX lowering's
        self.outputs = {n for n in self.demand
                        if feeds_output(n, entry_of, lambda n: False, lambda u: u in self.static, self.static)}
        self.bits: dict[fx.Node, int] = {}  # node -> width of the IntQuantTensor it holds
        self.origin: dict[fx.Node, tuple[fx.Node, tuple[fx.Node, ...]]] = {}  # through shape ops
        self.probabilities: set[fx.Node] = set()  # QuantSoftmax outputs (UINT16, read as they are)
        self.narrowed: dict[tuple[fx.Node, int], fx.Node] = {}
        self.input_bits: int | None = None  # of the registry entry being swapped
        self._names: set[str] = set(dict(self.gm.named_modules()))
        self._parameter_reads: dict[fx.Node, bool] = {}

    def run(self) -> fx.GraphModule:
        for node in list(self.graph.nodes):
            if node.op == "placeholder":
                self._input(node)
            elif node.op == "output":
                self._output(node)
            elif node not in self.static:
                self._swap(node)
        self.graph.lint()
        self.gm.recompile()
        return self.gm.to(self.dtype)  # the new layers in the model's float type

    # -- helpers ----------------------------------------------------------------------------------

    def act(self, node: fx.Node, bits: int | None = None):
        """The output quantizer of ``node`` (or, with ``bits``, of its narrowing to ``bits``: its range's grid)."""
        return iseg_act_quant(bits or self.demand[node], self.momentum, output=bits is None and node in self.outputs)

    def _add_module(self, name: str, module: nn.Module) -> str:
        base = name = name.replace(".", "_")
        i = 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        self.gm.add_submodule(name, module)
        return name

    def _emit(self, node: fx.Node, module: nn.Module, inputs: list, bits: int) -> fx.Node:
        """``node`` replaced by a call of ``module`` on ``inputs`` (a module call keeps its path)."""
        if node.op == "call_module":
            parent, _, leaf = node.target.rpartition(".")
            setattr(self.gm.get_submodule(parent), leaf, module)
            node.args, node.kwargs = tuple(inputs), {}
            new = node
        else:
            name = self._add_module(node.name, module)
            with self.graph.inserting_before(node):
                new = self.graph.call_module(name, tuple(inputs))
            node.replace_all_uses_with(new)
            self.graph.erase_node(node)
        self.bits[new] = bits
        return new

    def _quantized(self, arg, node: fx.Node) -> fx.Node:
        if not isinstance(arg, fx.Node) or arg not in self.bits:
            raise LoweringError(f"{describe(node)}: its operand {arg} is a constant or a Python value, which the "
                                "Brevitas swap does not quantize yet; the FX front end (fx_patterns) lowers it")
        return arg

    def need(self, arg, bits: int, node: fx.Node) -> fx.Node:
        """``arg`` as an IntQuantTensor of at most ``bits``: a DyadicRequant after the op that produced it (shape
        ops replayed after it: the range observed is the producer's, as in the FX lowering)."""
        value = self._quantized(arg, node)
        if self.bits[value] <= bits or value in self.probabilities:
            return value
        key = (value, bits)
        if key not in self.narrowed:
            origin, chain = self.origin.get(value, (value, ()))
            name = self._add_module(f"{origin.name}_to{bits}", DyadicRequant(act_quant=self.act(origin, bits)))
            with self.graph.inserting_after(origin):
                current = self.graph.call_module(name, (origin,))
            previous = origin
            for op in chain:  # the same shape ops on the narrowed integers
                with self.graph.inserting_after(current):
                    current = self.graph.node_copy(op, lambda n, p=previous, c=current: c if n is p else n)
                previous = op
            self.narrowed[key] = current
        return self.narrowed[key]

    def need_input(self, arg, node: fx.Node) -> fx.Node:
        """``arg`` at the input width of the registry entry being swapped (INT8 into GEMMs and GELU, INT16 else)."""
        return self.need(arg, self.input_bits, node)

    def _arg(self, node: fx.Node, i: int, name: str, default=None):
        return node.args[i] if i < len(node.args) else node.kwargs.get(name, default)

    def _parameter(self, value, node: fx.Node):
        """A parameter as the entry's attributes hold it: a tensor, None, or (computed in the model) a node."""
        if isinstance(value, fx.Node):
            raise LoweringError(f"{describe(node)}: its parameter {value.name} is computed in the model; the Brevitas "
                                "swap takes parameters as they are (use the FX front end)")
        return value

    # -- the graph --------------------------------------------------------------------------------

    def _input(self, node: fx.Node) -> None:
        name = self._add_module(f"{node.name}_quant",  # (an input is quantized on its range's grid, as in FX)
                                QuantIdentity(act_quant=self.act(node, self.demand[node]), return_quant_tensor=True))
        with self.graph.inserting_after(node):
            new = self.graph.call_module(name, (node,))
        node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
        self.bits[new] = self.demand[node]

    def _output(self, node: fx.Node) -> None:
        def check(arg):
            if isinstance(arg, fx.Node) and arg not in self.bits:
                raise LoweringError(f"the model's output {describe(arg)} is not quantized by the Brevitas swap")
        fx.map_arg(node.args[0], check)

    def _swap(self, node: fx.Node) -> None:
        entry = REGISTRY.entry_for(node, self.gm)
        if entry is None:
            raise LoweringError(f"{describe(node)} has no integer lowering: add a registry entry for it "
                                "(iseg_plugin.ops) or keep it out of the quantized model")
        handler = layer_for(entry)
        if handler is None:
            raise LoweringError(f"{describe(node)}: the registry's {entry.name!r} has no Brevitas layer yet; the "
                                "FX front end (fx_patterns.prepare / convert) lowers it")
        try:  # the entry's attributes and its one refusal predicate, as the FX / PT2E lowering reads them
            attributes = entry.read(NodeCall(node, self.gm))
        except UnsupportedOpError as err:
            raise LoweringError(f"{describe(node)}: {err}") from None
        self.input_bits = entry.quantized_input_bits  # the width need_input brings the entry's inputs to
        handler(self, node, attributes)

    def _linear(self, node: fx.Node, a: dict) -> None:
        x, weight, bias = node.args[0], self._parameter(a["weight"], node), self._parameter(a["bias"], node)
        linear = QuantLinear(weight.shape[1], weight.shape[0], bias=bias is not None,
                             weight_quant=Int8WeightPerChannelFloat, bias_quant=Int32Bias, return_quant_tensor=True)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        module = nn.Sequential(linear, DyadicRequant(act_quant=self.act(node)))
        self._emit(node, module, [self.need_input(x, node)], self.demand[node])

    def _layer_norm(self, node: fx.Node, a: dict) -> None:
        weight, bias = self._parameter(a["weight"], node), self._parameter(a["bias"], node)
        layer = QuantILayerNorm(a["channels"], a["eps"], act_quant=self.act(node))
        with torch.no_grad():
            if weight is not None:
                layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
        self._emit(node, layer, [self.need_input(node.args[0], node)], self.demand[node])

    def _gelu(self, node: fx.Node, a: dict) -> None:
        layer = QuantGELU(self.gelu, act_quant=self.act(node))
        self._emit(node, layer, [self.need_input(node.args[0], node)], self.demand[node])

    def _softmax(self, node: fx.Node, a: dict) -> None:
        new = self._emit(node, QuantSoftmax(self.softmax, a["dim"]), [self.need_input(node.args[0], node)], 16)
        self.probabilities.add(new)

    def _matmul(self, node: fx.Node, a: dict) -> None:
        a, b = node.args[0], node.args[1]
        inputs = [self.need_input(a, node), self.need_input(b, node)]
        self._emit(node, QuantMatMul(act_quant=self.act(node)), inputs, self.demand[node])

    def _add(self, node: fx.Node, a: dict) -> None:
        # an operand computed from parameters alone (a position embedding) is a constant: INT16, as in FX
        constant = [a in self.static for a in node.args[:2]]
        if all(constant) or not all(isinstance(a, fx.Node) for a in node.args[:2]):
            raise LoweringError(f"{describe(node)}: adding a Python number or two constants has no integer lowering")
        inputs = [a if c else self._quantized(a, node) for a, c in zip(node.args[:2], constant)]
        layer = QuantResidualAdd(act_quant=self.act(node), constant_bits=16 if any(constant) else None)
        self._emit(node, layer, inputs, self.demand[node])

    def _cat(self, node: fx.Node, a: dict) -> None:
        parts, dim = self._arg(node, 0, "tensors"), a["dim"]
        inputs = [p if isinstance(p, fx.Node) and p in self.static else self._quantized(p, node) for p in parts]
        self._emit(node, QuantCat(dim, act_quant=self.act(node)), inputs, self.demand[node])

    def _l2_normalize(self, node: fx.Node, a: dict) -> None:
        layer = QuantL2Norm(a["dim"], act_quant=self.act(node))  # (it checks that dim is the last at run time)
        self._emit(node, layer, [self.need_input(node.args[0], node)], self.demand[node])

    def _mean(self, node: fx.Node, a: dict) -> None:
        layer = QuantMean(a["dim"], a["keepdim"], act_quant=self.act(node))
        self._emit(node, layer, [self.need_input(node.args[0], node)], self.demand[node])

    def _conv(self, node: fx.Node, a: dict, transposed: bool) -> None:
        """Brevitas' QuantConv2d / QuantConvTranspose2d with the op's geometry (Brevitas computes the convolution;
        the DyadicRequant after it requantizes its per-channel accumulator, channels on dim 1)."""
        weight, bias = self._parameter(a["weight"], node), self._parameter(a["bias"], node)
        if transposed and a["groups"] != 1:  # (Brevitas' per-channel scales of a ConvTranspose run along dim 1, O/G)
            raise LoweringError(f"{describe(node)}: a grouped ConvTranspose2d's Brevitas weight scales are shared "
                                "across groups, the FX lowering's are per output channel; use the FX front end")
        out_channels = weight.shape[1] * a["groups"] if transposed else weight.shape[0]
        geometry = dict(stride=a["stride"], padding=a["padding"], dilation=a["dilation"], groups=a["groups"],
                        padding_mode=a["padding_mode"], bias=bias is not None, weight_quant=Int8WeightPerChannelFloat,
                        bias_quant=Int32Bias, return_quant_tensor=True)
        if transposed:
            conv = QuantConvTranspose2d(weight.shape[0], out_channels, a["kernel"], output_padding=a["output_padding"],
                                        **geometry)
        else:
            conv = QuantConv2d(weight.shape[1] * a["groups"], out_channels, a["kernel"], **geometry)
        with torch.no_grad():
            conv.weight.copy_(weight)
            if bias is not None:
                conv.bias.copy_(bias)
        module = nn.Sequential(conv, DyadicRequant(act_quant=self.act(node)))
        self._emit(node, module, [self.need_input(node.args[0], node)], self.demand[node])

    def _conv2d(self, node: fx.Node, a: dict) -> None:
        self._conv(node, a, transposed=False)

    def _conv_transpose2d(self, node: fx.Node, a: dict) -> None:
        self._conv(node, a, transposed=True)

    def _scalar_mul(self, node: fx.Node, divide: bool) -> None:
        a, b = node.args[0], node.args[1]
        if not divide and not (isinstance(a, fx.Node) and a in self.bits):
            a, b = b, a
        # a positive number, or one the model computes from shapes (a static node not reading any parameter:
        # passed at run time); a parameter (LayerScale's gamma) is a tensor: the FX front end lowers those
        number = isinstance(b, (int, float)) and b > 0
        from_shapes = isinstance(b, fx.Node) and b in self.static and not self._reads_parameters(b)
        if not divide and isinstance(b, fx.Node) and b in self.bits:  # two quantized tensors: their product
            inputs = [self.need_input(a, node), self.need_input(b, node)]
            self._emit(node, QuantMul(act_quant=self.act(node)), inputs, self.demand[node])
            return
        if not (number or from_shapes):
            raise LoweringError(f"{describe(node)}: the Brevitas swap takes products with a positive number only, or "
                                "of two quantized tensors (the FX front end lowers the others)")
        value = self._quantized(a, node)
        layer, inputs = (QuantScalarMul(b, divide), [value]) if number else (QuantScalarMul(None, divide), [value, b])
        # its own origin: a narrowing after it observes the scaled values, as the FX lowering's mul observer does
        self._emit(node, layer, inputs, self.bits[value])

    def _reads_parameters(self, node: fx.Node) -> bool:
        """Whether ``node``'s value is computed from a parameter's or buffer's values. A shape query reads none:
        ``(c // heads) ** -0.5`` with ``c`` from ``x.shape`` is a number, also where ``x`` was computed from a cls
        token or a position embedding."""
        if node not in self._parameter_reads:
            self._parameter_reads[node] = not is_shape_query(node) and (
                node.op == "get_attr" or any(self._reads_parameters(n) for n in node.all_input_nodes))
        return self._parameter_reads[node]

    def _mul(self, node: fx.Node, a: dict) -> None:
        self._scalar_mul(node, divide=False)

    def _div(self, node: fx.Node, a: dict) -> None:
        self._scalar_mul(node, divide=True)

    def _interpolate(self, node: fx.Node, a: dict) -> None:
        size, factor, mode = a["size"], a["scale_factor"], a["mode"]
        x = self.need_input(node.args[0], node)
        computed = isinstance(size, fx.Node) or (isinstance(size, (list, tuple)) and
                                                 any(isinstance(v, fx.Node) for v in size))
        if computed:  # a size the model computes from shapes: given at run time
            self._emit(node, QuantUpsample(None, None, mode, a["align_corners"]), [x, size], self.bits[x])
        else:
            self._emit(node, QuantUpsample(size, factor, mode, a["align_corners"]), [x], self.bits[x])

    def _shape(self, node: fx.Node, a: dict | None = None) -> None:
        value = self._quantized(node.args[0], node)
        if node.op != "call_module":  # (Dropout / Identity modules take an IntQuantTensor as they are)
            name = self._add_module(node.name, OnIntegers(node.target))
            with self.graph.inserting_before(node):
                new = self.graph.call_module(name, tuple(node.args), dict(node.kwargs))
            node.replace_all_uses_with(new)
            self.graph.erase_node(node)
            node = new
        self.bits[node] = self.bits[value]
        origin, chain = self.origin.get(value, (value, ()))
        self.origin[node] = (origin, chain + (node,))
        if value in self.probabilities:
            self.probabilities.add(node)

    _split = _shape

    def _on_input_grid(self, node: fx.Node, a: dict) -> None:
        """An entry whose output stays on its input's grid, as the generic layer :class:`QuantRegistryOp`."""
        value = self._quantized(node.args[0], node)
        entry = REGISTRY.entry_for(node, self.gm)
        new = self._emit(node, QuantRegistryOp(entry.name, a), [value], self.bits[value])
        if value in self.probabilities:
            self.probabilities.add(new)

    def _requantized(self, node: fx.Node, a: dict) -> None:
        """An entry with an output grid of its own, as the generic layer :class:`QuantRequantizedOp`."""
        entry = REGISTRY.entry_for(node, self.gm)
        layer = QuantRequantizedOp(entry.name, a, act_quant=self.act(node))
        self._emit(node, layer, [self.need_input(node.args[0], node)], self.demand[node])


# The Brevitas layer of each registry entry that has one of its own: how the swap puts it in (a table read by entry
# name). Other entries whose output stays on the input's grid and that name their float op get the generic
# QuantRegistryOp (layer_for); any other is refused, and tests/test_ops_registry.py fails for it.
LAYERS = {name: getattr(_Swap, f"_{name}") for name in (
    "linear", "conv2d", "conv_transpose2d", "matmul", "add", "mul", "div", "layer_norm", "gelu", "softmax",
    "l2_normalize", "interpolate", "mean", "cat", "shape", "split")}


def layer_for(entry):
    """How the swap puts in ``entry``'s Brevitas layer (a ``_Swap`` method taking the node and its attributes), or
    None where the entry has none."""
    if entry.name in LAYERS:
        return LAYERS[entry.name]
    if entry.float_op is None:
        return None
    return {"share": _Swap._on_input_grid, "output": _Swap._requantized}.get(entry.observation)


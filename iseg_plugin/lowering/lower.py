"""The lowering pass: a prepared (observed, calibrated) FX graph -> an integer-only GraphModule.

Input: the GraphModule that torch.ao's ``prepare_fx`` / ``prepare_qat_fx`` (or torchao's
``prepare_pt2e``) made with the plugin's configs, after calibration or training: float ops, each
followed by an :class:`~iseg_plugin.ops.observer.IsegObserver`. Output: a new graph in which every
value is an integer tensor with a known scale, and every float op is the deployed module of its
registry entry, built from the observed ranges (the reference conversion of torch.ao, with integer
modules instead of ``dequantize -> op -> quantize``).

* Values that do not depend on the input's values (parameters, position embeddings resized for the
  input's grid, shapes) are evaluated once, on the example inputs, and become integer constants or
  literals: the integer model is built for the example inputs' shapes, like the deployed Segmenter.
* Bit widths: each value is produced at the width its consumers need (INT8 into a GEMM or GELU,
  INT16 otherwise: the residual stream, I-LayerNorm and softmax inputs), from its observed range.
* What cannot be lowered (an op with no registry entry, an op with no output observer, a float
  value reaching an integer op) is refused with the node, the op and where it came from: a model is
  never returned float or partly float.
* ``trainable=True`` (quantization-aware training on the integer arithmetic itself): the same modules,
  but every integer constant derived from a parameter that requires grad (weights, biases, LayerNorm
  affines, embeddings) is a float tensor holding the integers, computed from the parameter with
  straight-through rounding, so the loss of the integer model reaches the float model's parameters.
  Constants of frozen parameters stay integer tensors, and so does every value computed from them
  alone: a frozen encoder runs on the deployed integer kernels, and its output turns into float64 where it
  meets the first trainable constant (a conversion node, exact). Inputs may be the deployed model's
  integers or float64 tensors holding them. It gives the deployed model's integers (tested). Lower it
  again after each optimizer step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.ao.quantization.fake_quantize import FakeQuantizeBase
from torch.ao.quantization.observer import ObserverBase
from torch._subclasses.fake_tensor import FakeTensorMode

from .. import intops
from ..ops import modules as M
from ..ops.modules import AsIntegers, Attention, Linear, LinearThen, MatMul, PixelsToInt8, Requant, storage_dtype
from ..ops.observer import IsegObserver
from ..ops.grid import Grid
from ..ops.registry import REGISTRY, OpEntry, UnsupportedOpError
from ..ops.site import NO_LOWERING, Const, LoweringError, Operand, describe


@dataclass
class Pending:
    """A registry op whose output observer has not been reached yet, or (``entry`` None) a model input
    not quantized yet: its placeholder in the new graph and the shape ops applied to it before its
    observer, replayed on the integers (they commute with quantization; zero pads to zero)."""

    node: fx.Node
    entry: OpEntry | None
    shape_ops: tuple[fx.Node, ...] = ()


def observer_of(module: nn.Module) -> IsegObserver | None:
    if isinstance(module, FakeQuantizeBase):
        module = module.activation_post_process
    if isinstance(module, IsegObserver):
        return module
    if isinstance(module, ObserverBase):
        raise LoweringError(
            f"{type(module).__name__} is not the plugin's observer: prepare the model with "
            "fx_patterns.get_iseg_qconfig_mapping() (or its observer, IsegObserver)")
    return None


def is_observer(gm: fx.GraphModule, n: fx.Node) -> bool:
    """Whether ``n`` calls an observer (or a fake-quantize) of the prepared graph ``gm``."""
    return n.op == "call_module" and isinstance(gm.get_submodule(n.target), (ObserverBase, FakeQuantizeBase))


class _Recorder(fx.Interpreter):
    """Runs the prepared graph on the example inputs, keeping the value of every static node and the
    shape of every tensor. Observers are bypassed (no range moves) unless ``observe`` (they then update
    their ranges from these inputs, as in calibration); static values keep their autograd history
    when ``trainable`` (they are the constants the trainable integer model is built from)."""

    def __init__(self, gm: fx.GraphModule, static: set[fx.Node], trainable: bool = False, observe: bool = False):
        super().__init__(gm)
        self.static, self.values, self.shapes = static, {}, {}
        self.trainable, self.observe = trainable, observe
        # the input-dependent values are needed for their shapes only, unless observed: fake tensors then
        # (shapes without arithmetic: a QAT step lowers the model again for each batch)
        self.fake = None if observe else FakeTensorMode(allow_non_fake_inputs=True)

    def run(self, *args):
        try:
            return super().run(*args)
        except Exception:  # an op fake tensors cannot run (e.g. a module updating its buffers): all real
            if self.fake is None:
                raise
            self.fake, self.values, self.shapes = None, {}, {}
            return super().run(*args)

    def run_node(self, n: fx.Node):
        module = self.module.get_submodule(n.target) if n.op == "call_module" else None
        if isinstance(module, (ObserverBase, FakeQuantizeBase)):
            out = self.env[n.args[0]]
            if self.observe and n not in self.static:  # (a weight's observer is the entry's business)
                observer_of(module)(out)
        elif n in self.static or self.fake is None:
            with torch.set_grad_enabled(self.trainable and n in self.static):
                out = super().run_node(n)
        else:
            with self.fake, torch.no_grad():
                out = super().run_node(n)
        if n in self.static:
            self.values[n] = out
        if isinstance(out, Tensor):
            self.shapes[n] = tuple(out.shape)
        return out


_ASSERTIONS = (torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten._assert_scalar.default,
               torch.ops.aten._assert_async.msg)


def _is_export_guard(node: fx.Node) -> bool:
    """torch.export's checks of the float model's inputs and dtypes (``_guards_fn``, ``_assert_*``):
    not part of the model, and wrong for its integers."""
    if node.users:
        return False
    return (node.op == "call_module" and node.target == "_guards_fn") or (
        node.op == "call_function" and node.target in _ASSERTIONS)


def is_shape_query(n: fx.Node) -> bool:
    """``x.shape`` / ``x.dtype`` / ``x.device`` / ``x.size()`` / ``x.dim()``: reads no value of ``x``."""
    return (n.op == "call_function" and n.target is getattr and n.args[1] in ("shape", "dtype", "device")) or (
        n.op == "call_method" and n.target in ("size", "dim"))


def static_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value does not depend on the input's values (only, at most, on its shape)."""
    static: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op in ("placeholder", "output"):
            continue
        if is_shape_query(n) or n.op == "get_attr" or all(a in static for a in n.all_input_nodes):
            static.add(n)
    return static


def consumer_bits(node: fx.Node, entry_of, transparent, ignored) -> int:
    """The width a value must have for every consumer: 8 if all of them are INT8 ops, else 16 (the model's
    output, INT16 ops, ops of any width). ``entry_of(n)``: the registry entry of a consumer; ``transparent(n)``:
    a consumer that passes the value on (an observer); ``ignored(n)``: a consumer that reads no integers
    (a shape query). Shared by the FX lowering and the Brevitas swap (:mod:`iseg_plugin.nn.swap`)."""
    widths = set()
    for user in node.users:
        if ignored(user):
            continue
        if user.op == "output":
            widths.add(16)
        elif transparent(user):
            widths.add(consumer_bits(user, entry_of, transparent, ignored))
        else:
            entry = entry_of(user)
            if entry is not None and entry.observation in ("share", "none"):
                widths.add(consumer_bits(user, entry_of, transparent, ignored))
            elif entry is not None and entry.input_bits is not None:
                widths.add(entry.input_bits)
            else:
                widths.add(16)
    return max(widths) if widths else 16


# Consumers that pass their input's integers on unchanged (a scale change at most): what they output, their
# input was already on the grid of (the shape ops are the entries of observation "share" / "none").
SAME_INTEGERS = ("interpolate", "mul", "div")


def feeds_output(node: fx.Node, entry_of, transparent, ignored, static=frozenset()) -> bool:
    """Whether ``node``'s integers are the model's output: it reaches the output through consumers that keep
    them (observers, shape ops, resizes, a product with a constant). ``entry_of`` / ``transparent`` /
    ``ignored`` as for :func:`consumer_bits`; ``static``: the values that do not depend on the input (a
    product with one of them keeps the integers or requantizes them to an output grid of its own)."""
    for user in node.users:
        if ignored(user):
            continue
        if user.op == "output":
            return True
        if transparent(user):
            passes = True
        else:
            entry = entry_of(user)
            passes = entry is not None and (entry.observation in ("share", "none") or entry.name in SAME_INTEGERS)
            if passes and entry.name in ("mul", "div"):  # x * c only, not x * y
                passes = all(a is node or a in static for a in user.all_input_nodes)
        if passes and feeds_output(user, entry_of, transparent, ignored, static):
            return True
    return False


def output_grid(observer: IsegObserver, bits: int, asymmetric: bool = False,
                output: bool = False) -> tuple[float, tuple[int, int]]:
    """Scale and integer bounds of an observed value on a ``bits``-wide grid: symmetric, or with
    ``asymmetric`` an INT8 value on the 256 levels of ``[lo, lo + 255]`` over its observed range, where a
    symmetric grid would waste a bit on a one-sided range (GELU >= -0.17; a Linear consumer shifts it into
    int8 and takes the shift back in its bias). INT16 values stay symmetric. ``output``: the value is the
    model's output (:func:`feeds_output`): a symmetric grid that covers every value calibration saw, with
    headroom (:meth:`IsegObserver.covering_scale`), not the EMA range (it would clip the logits an argmax reads)."""
    if output:
        return observer.covering_scale(bits), intops.int_range(bits)
    if not asymmetric or bits != 8:
        return observer.scale(bits), intops.int_range(bits)
    scale = intops.asymmetric_scale(observer.min_val, observer.max_val, 8)
    return float(scale), intops.asymmetric_bounds(observer.min_val, scale, 8)


# the softmax entry's deployed modules: the attention fusion takes any (each gives the fused kernel its exp table)
SOFTMAXES = tuple(getattr(M, name) for name in REGISTRY["softmax"].emits)


class Lowering:
    """One lowering of one prepared GraphModule (see the module docstring)."""

    def __init__(self, prepared: fx.GraphModule, example_inputs: tuple, pixels: dict | None = None,
                 trainable: bool = False, observe: bool = False):
        self.src = prepared
        self.trainable = trainable
        self.static = static_nodes(prepared.graph)
        recorder = _Recorder(prepared, self.static, trainable, observe)
        recorder.run(*example_inputs)
        self.values, self.shapes = recorder.values, recorder.shapes
        self.input_shapes = [tuple(x.shape) for x in example_inputs]
        self.pixels = pixels
        self.output_scales: list[float] = []
        self.root = nn.Module()
        self.graph = fx.Graph()
        self.graph.set_codegen(prepared.graph._codegen)  # torch.export's pytree in / out
        self.env: dict[fx.Node, Any] = {}
        self.input_formats: list[tuple[float, tuple[int, int]]] = []
        self._names: set[str] = set()
        self._float: set[fx.Node] = set()  # trainable form: the values that are float64 holding integers
        self._float_copies: dict[fx.Node, fx.Node] = {}

    # -- what entries use ------------------------------------------------------------------------

    def emit(self, name: str, module: nn.Module, *inputs) -> fx.Node:
        """Add ``module`` to the integer model and call it on ``inputs`` (nodes of the new graph). In the
        trainable form, a module that holds a trainable constant or reads a float value runs on float64:
        its integer inputs are converted first."""
        name = self._unique(name)
        self.root.add_module(name, module)
        if self.trainable and (any(t.is_floating_point() for t in module.state_dict().values())
                               or any(i in self._float for i in inputs)):
            inputs = tuple(self._as_float(i) for i in inputs)
            node = self.graph.call_module(name, inputs)
            self._float.add(node)
            return node
        return self.graph.call_module(name, tuple(inputs))

    def shape_op(self, op: str, target, args: tuple, kwargs: dict) -> fx.Node:
        """A call that moves integers without changing them (view, transpose, pad, ...); in the trainable
        form, float64 where its input is."""
        node = self.graph.create_node(op, target, args, kwargs)
        if any(i in self._float for i in node.all_input_nodes):
            self._float.add(node)
        return node

    def integers(self, value: Tensor, dtype: torch.dtype) -> Tensor:
        """A constant's integers in ``dtype``, or (trainable form, a constant computed from parameters that
        require grad) kept as the float tensor holding them, with its straight-through gradient."""
        return value if self.trainable and value.requires_grad else value.to(dtype)

    def constant(self, name: str, value: Tensor) -> fx.Node:
        name = self._unique(name)
        self.root.register_buffer(name, value)
        node = self.graph.get_attr(name)
        if value.is_floating_point():
            self._float.add(node)
        return node

    def _as_float(self, node):
        """An integer value of the trainable form as float64 (once per value); float values as they are."""
        if not isinstance(node, fx.Node) or node in self._float:
            return node
        if node not in self._float_copies:
            with self.graph.inserting_after(node):
                self._float_copies[node] = self.graph.call_method("double", (node,))
            self._float.add(self._float_copies[node])
        return self._float_copies[node]

    def demand(self, node: fx.Node) -> int:
        """The width a value must have for every consumer (:func:`consumer_bits`)."""
        return consumer_bits(node, lambda n: REGISTRY.entry_for(n, self.src), self._is_observer,
                             lambda n: n in self.static or _is_export_guard(n))

    def feeds_output(self, node: fx.Node) -> bool:
        """Whether the value is the model's output (:func:`feeds_output`)."""
        return feeds_output(node, lambda n: REGISTRY.entry_for(n, self.src), self._is_observer,
                            lambda n: n in self.static or _is_export_guard(n), self.static)

    def output_format(self, observer: IsegObserver, node: fx.Node, asymmetric: bool = False) -> tuple[float, tuple[int, int]]:
        """Scale and integer bounds of an op's output from its observer, at the width its consumers need (a model
        output: on a grid covering every value calibration saw)."""
        return output_grid(observer, self.demand(node), asymmetric, output=self.feeds_output(node))

    def need(self, operand: Operand | Const, bits: int, name: str) -> Operand:
        """``operand`` as integers of at most ``bits`` (a requantization is added where it is wider)."""
        lo, hi = intops.int_range(bits)
        if isinstance(operand, Const):
            return self.quantized_constant(operand, bits, name)
        if lo <= operand.bounds[0] and operand.bounds[1] <= hi:
            return operand
        if operand.observer is None:
            raise LoweringError(f"{name}: a {operand.bounds} value has no observed range to narrow it to {bits} bits")
        scale = operand.observer.scale(bits)
        node = self.emit(f"{name}_to{bits}", Requant.between(operand.scale, scale, (lo, hi)), operand.node)
        return Operand(node, scale, (lo, hi), operand.observer)

    def quantized_constant(self, const: Const, bits: int, name: str, scale: float | None = None) -> Operand:
        """A float constant (parameter, embedding) as a ``bits``-wide integer buffer."""
        if scale is None and const.observer is not None:
            scale = const.observer.scale(bits)
        ints, own_scale = intops.quantize_constant(const.value, bits, scale)
        scale = float(own_scale) if scale is None else scale
        bounds = intops.int_range(bits)
        ints = self.integers(ints, storage_dtype(bounds))
        return Operand(self.constant(name, ints), scale, bounds, const.observer)

    def shape(self, node: fx.Node) -> tuple[int, ...]:
        return self.shapes[node]

    # -- the pass --------------------------------------------------------------------------------

    def run(self) -> fx.GraphModule:
        with torch.set_grad_enabled(self.trainable):
            for node in self.src.graph.nodes:
                self.env[node] = self._lower_node(node)
        self._group_attention()
        self._group_linear_then()
        gm = fx.GraphModule(self.root, self.graph, class_name="IntegerModel")
        gm.input_formats, gm.output_scales = self.input_formats, self.output_scales
        gm.input_shapes = self.input_shapes
        return gm

    def _group_attention(self) -> None:
        """Each matmul -> softmax -> probabilities matmul chain (nothing else reading its scores or
        probabilities) becomes one :class:`Attention` module (the fused kernel's unit); same integers."""
        def module(node, kinds):
            if node.op != "call_module" or len(node.users) != 1:
                return None
            m = getattr(self.root, node.target)
            return m if isinstance(m, kinds) else None

        for context in list(self.graph.nodes):
            c = module(context, MatMul) if context.op == "call_module" else None
            probs = context.args[0] if c is not None and c.probabilities else None
            sm = module(probs, SOFTMAXES) if isinstance(probs, fx.Node) else None
            scores = probs.args[0] if sm is not None else None
            sc = module(scores, MatMul) if isinstance(scores, fx.Node) else None
            if sc is None or sc.probabilities:
                continue
            name = self._unique(f"{context.target}_attention")
            self.root.add_module(name, Attention(sc, sm, c))
            with self.graph.inserting_before(context):
                fused = self.graph.call_module(name, (scores.args[0], scores.args[1], context.args[1]))
            context.replace_all_uses_with(fused)
            for node in (context, probs, scores):
                self.graph.erase_node(node)
                delattr(self.root, node.target)

    def _group_linear_then(self) -> None:
        """Each Linear whose output only an element-wise module reads (``ELEMENTWISE``) becomes one
        :class:`LinearThen` with it (the blocked kernel's unit); same integers."""
        def elementwise_after(linear: fx.Node) -> fx.Node | None:
            (then,) = linear.users if len(linear.users) == 1 else (None,)
            if then is None or then.op != "call_module" or then.args != (linear,) or then.kwargs:
                return None
            return then if getattr(getattr(self.root, then.target), "ELEMENTWISE", False) else None

        pairs = [(node, elementwise_after(node)) for node in self.graph.nodes
                 if node.op == "call_module" and isinstance(getattr(self.root, node.target), Linear)]
        for linear, then in pairs:
            if then is None:
                continue
            name = self._unique(f"{then.target}_after_linear")
            self.root.add_module(name, LinearThen(getattr(self.root, linear.target), getattr(self.root, then.target)))
            with self.graph.inserting_before(then):
                fused = self.graph.call_module(name, linear.args, linear.kwargs)
            then.replace_all_uses_with(fused)
            for node in (then, linear):
                self.graph.erase_node(node)
                delattr(self.root, node.target)

    def _unique(self, name: str) -> str:
        base = name = name.replace(".", "_")
        i = 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def _is_observer(self, node: fx.Node) -> bool:
        return is_observer(self.src, node)

    def _lower_node(self, node: fx.Node):
        if _is_export_guard(node):
            return None
        if node.op == "placeholder":
            return self._input(node)
        if node.op == "output":
            return self._output(node)
        if node in self.static:  # (a weight's torch.ao observer is not the plugin's: the entry quantizes it)
            module = self.src.get_submodule(node.target) if self._is_observer(node) else None
            observer = module if isinstance(module, IsegObserver) else None
            return Const(self.values[node], observer)
        if self._is_observer(node):
            return self._observed(node, observer_of(self.src.get_submodule(node.target)))
        entry = REGISTRY.entry_for(node, self.src)
        if entry is None:
            why = node.meta.get(NO_LOWERING)  # a front end's reason for leaving the op as it is
            raise LoweringError(f"{describe(node)} has no integer lowering" + (f": {why}" if why else "") +
                                ": add a registry entry for it (iseg_plugin.ops) or keep it out of the quantized model")
        if entry.observation in ("share", "none"):
            source = next((self.env[a] for a in node.all_input_nodes if isinstance(self.env.get(a), Pending)), None)
            if source is not None and source.entry is None:  # a shape op on an input: after its quantization
                return Pending(source.node, None, source.shape_ops + (node,))
            variant = entry.variant(None)
            return variant.lower(Site(self, node, entry, None), variant)
        return Pending(node, entry)

    def _input(self, node: fx.Node) -> Pending:
        return Pending(self.graph.placeholder(node.name), None)  # quantized at its observer

    def _observed(self, node: fx.Node, observer: IsegObserver) -> Operand:
        if not observer.calibrated():
            raise LoweringError(f"{describe(node)}: its observer saw no data; calibrate the prepared model "
                                "(run it on a few inputs) before converting")
        source = self.env[node.args[0]]
        if isinstance(source, Operand):
            return source  # a second observer of a value already lowered (after a shape op)
        if source.entry is None:  # a model input: quantized before the integer model, or uint8 pixels
            value = self._quantized_input(node, source.node, observer)
            for shape_op in source.shape_ops:
                self.env[shape_op.all_input_nodes[0]] = value
                entry = REGISTRY.entry_for(shape_op, self.src)
                value = entry.variant(None).lower(Site(self, shape_op, entry, None), entry.variant(None))
            return value
        variant = source.entry.variant(observer.variant)
        return variant.lower(Site(self, source.node, source.entry, observer, node), variant)

    def _quantized_input(self, node: fx.Node, placeholder: fx.Node, observer: IsegObserver) -> Operand:
        if self.pixels is not None:
            scale = observer.scale(8)
            module = PixelsToInt8(*intops.pixel_params(self.pixels["mean"], self.pixels["std"], scale))
            self.input_formats.append((scale, (0, 255)))
            pixels = self._as_stored(placeholder, torch.uint8)
            return Operand(self.emit("pixels_to_int8", module, pixels), scale, (-128, 127), observer)
        bits = self.demand(node)
        scale = observer.scale(bits)
        bounds = intops.int_range(bits)
        self.input_formats.append((scale, bounds))
        return Operand(self._as_stored(placeholder, storage_dtype(bounds)), scale, bounds, observer)

    def _as_stored(self, placeholder: fx.Node, dtype: torch.dtype) -> fx.Node:
        """The trainable form's input as the deployed model's integer dtype (it may be given float64 holding
        the integers): the integer kernels run until the first trainable constant. No input gradient."""
        if not self.trainable:
            return placeholder
        return self.emit(f"{placeholder.name}_as_{str(dtype).removeprefix('torch.')}", AsIntegers(dtype), placeholder)

    def _output(self, node: fx.Node):
        scales = []

        def to_new(arg):
            value = self.env[arg]
            if isinstance(value, Operand):
                scales.append(value.scale)
                return value.node
            if isinstance(value, Const) and not isinstance(value.value, Tensor):
                return value.value
            raise LoweringError(f"the model's output {describe(arg)} is not quantized: it would leave the "
                                "integer model as a float (is an observer missing after it?)")

        self.graph.output(fx.map_arg(node.args[0], to_new))
        self.output_scales = scales
        return None


class Site:
    """One float op being lowered: its arguments as Operands / Consts, its module, its output observer."""

    def __init__(self, lowering: Lowering, node: fx.Node, entry: OpEntry, observer: IsegObserver | None,
                 observer_node: fx.Node | None = None):
        self.lowering, self.node, self.entry, self.observer = lowering, node, entry, observer
        self.observer_node = observer_node
        self.name = node.name
        self.module = lowering.src.get_submodule(node.target) if node.op == "call_module" else None
        self.target = None if node.op == "call_module" else node.target
        self.args = [self.resolve(a) for a in node.args]
        self.kwargs = {k: self.resolve(v) for k, v in node.kwargs.items()}
        try:  # the op's attributes, refused here where its entry's check says so (both front ends share it)
            self.attrs = entry.read(self) if entry is not None else {}
        except UnsupportedOpError as err:
            raise self.refuse(str(err)) from None

    def resolve(self, arg):
        if isinstance(arg, fx.Node):
            value = self.lowering.env[arg]
            if isinstance(value, Pending):
                raise LoweringError(f"{describe(arg)} feeds {describe(self.node)} without an observer in "
                                    "between: its output would stay float (is the op in the backend config?)")
            return value
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.resolve(a) for a in arg)
        return arg

    def arg(self, i: int, name: str | None = None, default=None):
        """Positional argument ``i`` or keyword ``name``, Consts unwrapped to their value."""
        value = self.args[i] if i < len(self.args) else self.kwargs.get(name, default)

        def unwrap(v):
            if isinstance(v, (list, tuple)):
                return type(v)(unwrap(u) for u in v)
            return v.value if isinstance(v, Const) else v

        return unwrap(value)

    def input(self, i: int = 0, bits: int | None = None) -> Operand:
        value = self.args[i]
        if not isinstance(value, (Operand, Const)):
            raise LoweringError(f"{describe(self.node)}: argument {i} is {type(value).__name__}, not a tensor")
        if bits is None:
            bits = self.entry.quantized_input_bits
        return self.lowering.need(value, bits, f"{self.name}_in{i}")

    def input_shape(self, i: int = 0) -> tuple[int, ...]:
        return self.lowering.shape(self.node.args[i])

    def output_format(self) -> tuple[float, tuple[int, int]]:
        return self.lowering.output_format(self.observer, self.observer_node)

    def output_grid(self, asymmetric: bool = False) -> Grid:
        """The output's grid from its observer (asymmetric INT8 where only GEMMs read it and ``asymmetric``)."""
        return Grid.of(*self.lowering.output_format(self.observer, self.observer_node, asymmetric=asymmetric))

    def asymmetric_output_format(self) -> tuple[float, tuple[int, int]]:
        """The output on an asymmetric grid where INT8 consumers read it (see :func:`output_grid`)."""
        return self.lowering.output_format(self.observer, self.observer_node, asymmetric=True)

    def requant_to_output(self, in_scale, asymmetric: bool = False) -> tuple[Requant, float, tuple[int, int]]:
        scale, bounds = self.asymmetric_output_format() if asymmetric else self.output_format()
        return Requant.between(in_scale, scale, bounds), scale, bounds

    def emit(self, module: nn.Module, *inputs: fx.Node) -> fx.Node:
        return self.lowering.emit(self.name, module, *inputs)

    def out(self, node: fx.Node, scale: float, bounds: tuple[int, int]) -> Operand:
        return Operand(node, scale, bounds, self.observer)

    def refuse(self, why: str) -> LoweringError:
        return LoweringError(f"{describe(self.node)}: {why}")

    def shape(self) -> tuple[int, ...]:
        return self.lowering.shape(self.node)

    def map_to_new(self, value):
        """An argument for a node of the new graph: Operands by their node, Consts by their value."""
        if isinstance(value, Operand):
            return value.node
        if isinstance(value, Const):
            if isinstance(value.value, Tensor) and value.value.is_floating_point():
                raise self.refuse("a float constant tensor would enter an integer op; quantize it through an "
                                  "observed op (add, cat, mul) instead")
            if isinstance(value.value, Tensor):  # indices that do not depend on the input (gather, index_select)
                return self.lowering.constant(f"{self.name}_index", value.value)
            return value.value
        if isinstance(value, (list, tuple)):
            return type(value)(self.map_to_new(v) for v in value)
        return value


def lower(prepared: fx.GraphModule, example_inputs: tuple, pixels: dict | None = None, trainable: bool = False,
          observe: bool = False) -> fx.GraphModule:
    """Lower a prepared, calibrated GraphModule to an integer-only one (see the module docstring).

    ``pixels=dict(mean=..., std=...)``: the model's (first) input is an image normalised with them; the
    integer model then takes uint8 RGB pixels and folds the normalisation into its first requantization.
    Otherwise it takes each input as integers at ``input_formats`` (``quantize_inputs`` makes them).
    ``trainable``: the QAT form (float64 inputs holding those integers; see the module docstring);
    ``observe``: the observers update their ranges from ``example_inputs`` first (QAT's warm-up).
    """
    if not trainable:
        with torch.no_grad():
            return Lowering(prepared, example_inputs, pixels, observe=observe).run()
    return Lowering(prepared, example_inputs, pixels, trainable=True, observe=observe).run()


def quantize_inputs(model: fx.GraphModule, *inputs: Tensor) -> tuple[Tensor, ...]:
    """Float inputs -> the integers an integer model takes (preprocessing, outside the model)."""
    return tuple(intops.quantize(x.float(), torch.tensor(scale), bounds).to(storage_dtype(bounds))
                 for x, (scale, bounds) in zip(inputs, model.input_formats))


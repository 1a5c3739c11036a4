"""The operator registry: one entry per integer operator, the one place an operator is defined.

An :class:`OpEntry` owns its operator:

* which float ops it replaces (modules, functions and tensor methods in a torch.ao FX graph; ATen
  operators in a ``torch.export`` / torchao PT2E graph), how its output is observed (its own observer,
  or the input's for shape ops) and the bit width its quantized inputs must have;
* ``attributes(call)``: the op's attributes read from a call of it (the lowering's site or the Brevitas
  swap's node), and ``check(attributes)``: the one refusal predicate, the reason no integer form exists;
* its variants (the first is the default): a :class:`Variant`'s ``build`` turns the input grids, the
  output :class:`~.grid.Grid` and the attributes into the deployed module of :mod:`.modules`, integer
  constants computed once (TFLite's Prepare; torch.ao's ``from_observed``), and its ``lower`` places it
  in the lowered graph (most entries: :func:`lower_built`);
* ``float_op(attributes, *inputs)``: the float op itself, which the generic Brevitas layer runs while it
  observes (entries without a layer of their own);
* ``emits``: the deployed module classes it builds (each describes its QONNX node: :mod:`.modules`);
* its doc line.

The torch.ao BackendConfig, the qconfig mapping, the PT2E annotator, the lowering pass, the Brevitas swap
and layers, both QONNX exports, the per-layer choice and the docs' operator table are all read from here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

from torch import fx, nn


class UnknownVariantError(ValueError):
    """A variant name the registry does not know."""


class UnsupportedOpError(ValueError):
    """An op whose attributes have no integer form (the entry's ``check``); the front end names the node."""


class OpCall(Protocol):
    """A call of an op, as an entry's ``attributes`` reads it: from the lowering's site (values known) or the Brevitas
    swap's traced node (shapes unknown: ``input_shape`` gives None)."""

    node: fx.Node  # the call in its graph (its users, its arguments as nodes)
    module: nn.Module | None  # the called module, for a module call
    target: object  # the called function, ATen operator or method name (None for a module call)

    def arg(self, i: int, name: str | None = None, default=None): ...  # an argument's value (constants unwrapped)
    def input_shape(self, i: int = 0) -> tuple[int, ...] | None: ...


@dataclass(frozen=True)
class Variant:
    name: str
    lower: Callable  # (Site, Variant) -> Operand: the deployed module placed in the lowered graph
    doc: str
    # (attributes, input Grids, output Grid or None[, integers]) -> the deployed module, its integer constants
    # computed once: what every front end runs (``integers(tensor, dtype)``: how the lowering stores constants)
    build: Callable | None = None


@dataclass(frozen=True)
class OpEntry:
    name: str
    doc: str
    modules: tuple[type, ...] = ()
    functions: tuple = ()
    methods: tuple[str, ...] = ()
    aten: tuple = ()  # the same ops as ``torch.export`` records them (torchao PT2E)
    observation: str = "output"  # "output": its own output observer; "share": the input's; "none": no observer
    input_bits: int | None = 16  # width its quantized inputs are brought to (None: any integers)
    variants: dict[str, Variant] = field(default_factory=dict)  # the first is the default
    onnx: str = "traced: the deployed module's intops, with the exporter's integer lowerings"
    attributes: Callable = lambda call: {}  # (call) -> dict: the op's attributes (see OpCall)
    check: Callable = lambda attributes: None  # (attributes) -> why it has no integer form, or None
    float_op: Callable | None = None  # (attributes, *inputs) -> the float op's result (the generic Brevitas layer)
    emits: tuple[str, ...] = ()  # the deployed module classes (ops.modules) it builds

    @property
    def quantized_input_bits(self) -> int:
        """The width a front end brings this op's quantized inputs to: ``input_bits``, 16 where any width does."""
        return self.input_bits or 16

    def read(self, call) -> dict:
        """The op's attributes from ``call``, refused (:class:`UnsupportedOpError`) where ``check`` says why."""
        attributes = self.attributes(call)
        why = self.check(attributes)
        if why:
            raise UnsupportedOpError(why)
        return attributes

    def variant(self, name: str | None) -> Variant:
        if name is None:
            return next(iter(self.variants.values()))
        if name not in self.variants:
            raise UnknownVariantError(
                f"unknown {self.name} variant {name!r}; known: {', '.join(sorted(self.variants))}")
        return self.variants[name]

    def targets(self) -> tuple:
        """The float ops of a torch.ao FX graph (the BackendConfig's patterns)."""
        return self.modules + self.functions + self.methods

    def matches(self, node: fx.Node, module: nn.Module | None) -> bool:
        if node.op == "call_module":
            return isinstance(module, self.modules)
        if node.op == "call_function":
            return node.target in self.functions or node.target in self.aten
        return node.op == "call_method" and node.target in self.methods


class OpRegistry:
    def __init__(self):
        self._entries: dict[str, OpEntry] = {}

    def register(self, entry: OpEntry) -> OpEntry:
        if entry.name in self._entries:
            raise ValueError(f"operator {entry.name!r} is already registered")
        taken = {t for e in self._entries.values() for t in e.targets() + e.aten}
        clash = [t for t in entry.targets() + entry.aten if t in taken]
        if clash:
            raise ValueError(f"{entry.name}: {clash} already lowered by another entry")
        self._entries[entry.name] = entry
        return entry

    def __getitem__(self, name: str) -> OpEntry:
        if name not in self._entries:
            raise KeyError(f"no operator {name!r}; known: {', '.join(sorted(self._entries))}")
        return self._entries[name]

    def __iter__(self):
        return iter(self._entries.values())

    def table(self) -> str:
        """The markdown table of the operators (docs/operators.md holds it; a test compares)."""
        rows = ["| entry | replaces | integer form | variants (first: default) |", "|---|---|---|---|"]
        for e in self._entries.values():
            names = [getattr(t, "__name__", None) or str(t) for t in e.targets()]
            replaces = ", ".join(f"`{n}`" for n in dict.fromkeys(names))
            variants = "; ".join(f"`{v.name}`: {v.doc}" for v in e.variants.values())
            rows.append(f"| `{e.name}` | {replaces} | {e.doc} | {variants} |")
        return "\n".join(rows)

    def entry_for(self, node: fx.Node, root: nn.Module) -> OpEntry | None:
        """The entry that lowers ``node`` (a call of a module of ``root``, a function, an ATen operator or a
        tensor method)."""
        module = root.get_submodule(node.target) if node.op == "call_module" else None
        return next((entry for entry in self._entries.values() if entry.matches(node, module)), None)


REGISTRY = OpRegistry()

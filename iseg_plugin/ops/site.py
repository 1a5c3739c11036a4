"""What a registry entry sees of the lowering pass: the values of the graph being lowered (:class:`Operand`,
:class:`Const`), its error, and :class:`OpSite`, the protocol of one op being lowered (the lowering pass of
:mod:`iseg_plugin.lowering` implements it). A leaf: the entries read this, not the pass, so the registry and
the pass do not import each other."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from torch import fx, nn

from .grid import Grid
from .observer import IsegObserver


class LoweringError(RuntimeError):
    """A node of the model has no integer lowering."""


# node.meta key a front end sets on an op it leaves as it is, with the reason (torchao PT2E's attention rewrite):
# the refusal of the op says it
NO_LOWERING = "iseg_no_lowering"


@dataclass(frozen=True)
class Operand:
    """An integer tensor of the new graph (or a tuple of them, before getitem) and its real scale."""

    node: fx.Node
    scale: float
    bounds: tuple[int, int]
    observer: IsegObserver | None

    @property
    def grid(self) -> Grid:
        return Grid.of(self.scale, self.bounds)


@dataclass(frozen=True)
class Const:
    """A value that does not depend on the input's values: a tensor (parameters) or a Python value."""

    value: Any
    observer: IsegObserver | None = None


def describe(node: fx.Node) -> str:
    """The node, its op and the source line it was traced from (where FX recorded it)."""
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    trace = (node.meta.get("stack_trace") or node.stack_trace or "").strip().splitlines()
    files = [i for i, line in enumerate(trace) if line.strip().startswith("File ") and "/torch/" not in line]
    where = ""
    if files:
        i = files[-1]
        where = " at " + trace[i].strip() + (": " + trace[i + 1].strip() if i + 1 < len(trace) else "")
    return f"node '{node.name}' ({node.op} {target}){where}"


class OpSite(Protocol):
    """One float op being lowered, as an entry's ``lower`` uses it (``iseg_plugin.lowering.lower.Site``)."""

    node: fx.Node
    name: str
    module: nn.Module | None  # the called module (``call_module``), else None
    observer: IsegObserver | None  # its output observer
    args: list  # its arguments: Operands, Consts, Python values
    kwargs: dict
    lowering: Any  # the pass: integers(), quantized_constant(), shape(), shape_op(), trainable

    def arg(self, i: int, name: str | None = None, default=None): ...
    def input(self, i: int = 0, bits: int | None = None) -> Operand: ...
    attrs: dict  # the op's attributes (its entry's ``attributes``), checked
    def input_shape(self, i: int = 0) -> tuple[int, ...]: ...
    def output_format(self) -> tuple[float, tuple[int, int]]: ...
    def output_grid(self, asymmetric: bool = False) -> Grid: ...
    def asymmetric_output_format(self) -> tuple[float, tuple[int, int]]: ...
    def requant_to_output(self, in_scale, asymmetric: bool = False): ...
    def emit(self, module: nn.Module, *inputs: fx.Node) -> fx.Node: ...
    def out(self, node: fx.Node, scale: float, bounds: tuple[int, int]) -> Operand: ...
    def refuse(self, why: str) -> LoweringError: ...
    def shape(self) -> tuple[int, ...]: ...
    def map_to_new(self, value): ...


class NodeCall:
    """A node of a traced graph as an entry's ``attributes`` reads it (the registry's ``OpCall``), for front ends
    that have the graph but not its values (the Brevitas swap, the per-layer choice): arguments as the graph
    holds them, a parameter or buffer (``get_attr``) as its tensor, other computed values as their nodes; no
    shapes (``input_shape`` gives None)."""

    def __init__(self, node: fx.Node, root: nn.Module):
        self.node, self.root = node, root
        self.module = root.get_submodule(node.target) if node.op == "call_module" else None
        self.target = None if self.module is not None else node.target

    def _value(self, n: fx.Node):
        if n.op != "get_attr":
            return n
        owner, _, name = n.target.rpartition(".")
        return getattr(self.root.get_submodule(owner), name)

    def arg(self, i: int, name: str | None = None, default=None):
        value = self.node.args[i] if i < len(self.node.args) else self.node.kwargs.get(name, default)
        return fx.map_arg(value, self._value) if isinstance(value, (fx.Node, list, tuple, dict)) else value

    def input_shape(self, i: int = 0) -> None:
        return None

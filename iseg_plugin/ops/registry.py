"""The operator registry: one entry per integer operator, the one place an operator is defined.

An :class:`OpEntry` says which float ops it replaces (modules, functions and tensor methods in a
torch.ao FX graph; ATen operators in a ``torch.export`` / torchao PT2E graph), how its
output is observed (its own observer, or the input's for shape ops), the bit width its quantized
inputs must have, and its variants. A :class:`Variant` turns the observed scales into integer
constants once, at conversion (``lower``: in the style of torch.ao's ``from_observed`` / TFLite's
Prepare), and returns the deployed module of :mod:`.modules` that computes it; the arithmetic itself
is in :mod:`iseg_plugin.intops`. The torch.ao BackendConfig, the qconfig mapping, the lowering pass
and the docs' table of supported ops are all read from here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import fx, nn


class UnknownVariantError(ValueError):
    """A variant name the registry does not know."""


@dataclass(frozen=True)
class Variant:
    name: str
    lower: Callable  # (Site) -> Operand: constants from the observed scales, the deployed module emitted
    doc: str
    # The deployed module from scales alone, for front ends without an FX site (the Brevitas layers of
    # iseg_plugin.nn); its arguments are the entry's (GELU: in_scale, out, samples; softmax: in_scale, bits, dim).
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

    def entry_for(self, node: fx.Node, root: nn.Module) -> OpEntry | None:
        """The entry that lowers ``node`` (a call of a module of ``root``, a function, an ATen operator or a
        tensor method)."""
        module = root.get_submodule(node.target) if node.op == "call_module" else None
        return next((entry for entry in self._entries.values() if entry.matches(node, module)), None)


REGISTRY = OpRegistry()

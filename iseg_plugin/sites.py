"""The sites of per-layer choices in a calibrated prepared graph (the GELUs and softmaxes whose variant, the
GEMMs whose weight width is chosen per layer) and :class:`Probe`, which runs that graph as the float model with
one op replaced. Shared by the unified metric (:mod:`.select`) and GPTQ's rounding (:mod:`.gptq`)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from .lowering import is_observer, observer_of
from .ops import REGISTRY
from .ops.observer import IsegObserver

CHOICES = ("gelu", "softmax")  # the registry entries whose variants are chosen per layer
GEMMS = ("linear", "conv2d")  # the entries whose weight width is chosen per layer


class Probe(fx.Interpreter):
    """The calibrated prepared graph run as the float model (observers pass values through without
    recording them), with one node's output replaced: ``replace(args, kwargs, float_output)``; ``taps``:
    ``{node: fn(args, kwargs)}`` called with the arguments of those nodes (to collect their inputs)."""

    def __init__(self, gm: fx.GraphModule, node: fx.Node | None = None, replace=None, taps: dict | None = None):
        super().__init__(gm)
        self.node, self.replace, self.taps = node, replace, taps or {}
        self.exact = self.approx = None

    def run_node(self, n: fx.Node):
        if n.op == "call_module" and is_observer(self.module, n):
            return self.env[n.args[0]]
        if n in self.taps:
            self.taps[n](*self.fetch_args_kwargs_from_env(n))
        out = super().run_node(n)
        if n is self.node:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            self.exact, out = out, self.replace(args, kwargs, out)
            self.approx = out
        return out


@dataclass
class ChoiceSite:
    """An op whose choice is made per layer: its node, registry entry and observers."""

    node: fx.Node
    entry: str
    observer: IsegObserver  # its output's: where the choice is written
    input_observer: IsegObserver | None


def sites(prepared: fx.GraphModule, entries=CHOICES + GEMMS) -> list[ChoiceSite]:
    """The ops of ``entries`` in a prepared graph that have an output observer (in graph order)."""
    found = []
    for node in prepared.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        entry = REGISTRY.entry_for(node, prepared)
        if entry is None or entry.name not in entries:
            continue
        out = next((u for u in node.users if is_observer(prepared, u)), None)
        if out is None:
            continue
        source = node.args[0] if node.args else None
        into = (observer_of(prepared.get_submodule(source.target))
                if isinstance(source, fx.Node) and is_observer(prepared, source) else None)
        found.append(ChoiceSite(node, entry.name, observer_of(prepared.get_submodule(out.target)), into))
    return found

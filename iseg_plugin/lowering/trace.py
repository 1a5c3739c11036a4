"""Where torch.fx fails to trace a model: the innermost module it was tracing (for the front ends' refusals)."""
from __future__ import annotations

from torch import fx, nn


class LocatingTracer(fx.Tracer):
    """Traces as ``fx.symbolic_trace`` (and torch.ao) do and remembers which module it is inside."""

    def __init__(self):
        super().__init__()
        self.stack: list[tuple[str, nn.Module]] = []

    def call_module(self, m, forward, args, kwargs):
        self.stack.append((self.path_of_module(m), m))
        out = super().call_module(m, forward, args, kwargs)
        self.stack.pop()
        return out


def locate_trace_failure(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The path ('' for the root) and module inside which torch.fx fails to trace ``model``; None if it traces."""
    tracer = LocatingTracer()
    try:
        tracer.trace(model)
    except Exception:  # noqa: BLE001 - any failure here is the one to locate
        return tracer.stack[-1] if tracer.stack else ("", model)
    return None

"""Audit of a forward pass: every aten op that runs, with the dtypes it consumes and produces."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass(frozen=True)
class OpRecord:
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    elements: int = 0  # elements the op wrote (its outputs' sizes): the operation count of an element-wise op

    @property
    def uses_float(self) -> bool:
        return any(d.startswith("torch.float") or d.startswith("torch.bfloat") or d.startswith("torch.complex")
                   for d in self.inputs + self.outputs)


def _dtypes(tree) -> tuple[str, ...]:
    return tuple(str(t.dtype) for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor))


class OpAudit(TorchDispatchMode):
    """``with OpAudit() as audit: model(x)``; then ``audit.records`` and ``audit.float_ops()``."""

    def __init__(self):
        super().__init__()
        self.records: list[OpRecord] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        written = sum(t.numel() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        self.records.append(OpRecord(str(func), _dtypes((args, kwargs)), _dtypes(out), written))
        return out

    def float_ops(self) -> list[OpRecord]:
        return [r for r in self.records if r.uses_float]

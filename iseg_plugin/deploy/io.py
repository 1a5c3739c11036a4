"""Deployed model files: integer tensors plus a structural record, loaded without unpickling code.

A file is ``torch.save({'format': ..., 'tree': spec, 'state_dict': {...}})`` where ``spec`` is a
nested dict of plain values (module class names from :mod:`.modules` / :mod:`.segmenter`, their
int/str attributes). Loading uses ``torch.load(weights_only=True)`` and instantiates only the
classes listed here, so a file is data, never code.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import modules, segmenter

FORMAT = "iseg-deployed-v1"
_CLASSES = {cls.__name__: cls for cls in (
    modules.Requant, modules.IntLinear, modules.IntAdd, modules.IntLayerNorm, modules.IntGELU, modules.IntSoftmax,
    modules.IntAttention, modules.IntMlp, modules.IntBlock, segmenter.DeployedEncoder, segmenter.DeployedDecoder,
    segmenter.DeployedSegmenter, nn.ModuleList)}
_PLAIN = (int, str, bool, type(None))


class DeployedFileError(ValueError):
    """A file that is not a deployed iseg model (or is damaged)."""


def _spec(module: nn.Module) -> dict:
    attrs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(module).items()
             if not k.startswith("_") and k != "training" and isinstance(v, (*_PLAIN, tuple, list, dict))}
    return {"type": type(module).__name__, "attrs": attrs,
            "buffers": sorted(k for k, v in module._buffers.items() if v is not None),
            "none_buffers": sorted(k for k, v in module._buffers.items() if v is None),
            "children": {name: _spec(child) for name, child in module._modules.items()}}


def _build(spec: dict, state: dict, prefix: str) -> nn.Module:
    cls = _CLASSES.get(spec.get("type"))
    if cls is None:
        raise DeployedFileError(f"unknown module type {spec.get('type')!r} at '{prefix}'")
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    for key, value in spec["attrs"].items():
        setattr(module, key, tuple(value) if key == "input_size" else value)
    for name in spec["buffers"]:
        tensor = state.get(prefix + name)
        if not isinstance(tensor, torch.Tensor) or tensor.dtype.is_floating_point:
            raise DeployedFileError(f"missing or non-integer tensor '{prefix + name}'")
        module.register_buffer(name, tensor)
    for name in spec["none_buffers"]:
        module.register_buffer(name, None)
    for name, child in spec["children"].items():
        module.add_module(name, _build(child, state, f"{prefix}{name}."))
    return module


def module_spec(module: nn.Module) -> dict:
    """The plain-data record of a deployed module (class name, attributes, buffer names, children)."""
    return _spec(module)


def module_from_spec(spec: dict, state: dict) -> nn.Module:
    """Rebuild a deployed module from :func:`module_spec` and its integer state dict (allowlisted classes only)."""
    return _build(spec, state, "")


def save_deployed(model: segmenter.DeployedSegmenter, path: str | Path) -> int:
    """Write the model; returns the file size in bytes."""
    state = model.state_dict()
    floats = [k for k, v in state.items() if v.dtype.is_floating_point]
    if floats:
        raise ValueError(f"a deployed model holds integers only; float tensors found: {floats[:3]}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": FORMAT, "tree": _spec(model), "state_dict": state}, path)
    return path.stat().st_size


def load_deployed(path: str | Path) -> segmenter.DeployedSegmenter:
    """Read a deployed model written by :func:`save_deployed` (safe loader; clear errors)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no deployed model at {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling failure: say what the file is not
        raise DeployedFileError(f"{path} is not a readable deployed model ({type(err).__name__}: {err})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise DeployedFileError(f"{path} is not an iseg deployed model (format {FORMAT!r} expected)")
    model = _build(blob["tree"], blob["state_dict"], "")
    if not isinstance(model, segmenter.DeployedSegmenter):
        raise DeployedFileError(f"{path} does not hold a DeployedSegmenter")
    return model.eval()

"""Deployed model files: integer tensors plus a plain-data record of the graph, loaded without code.

A file is ``torch.save({'format': ..., 'model': record, 'state_dict': {...}, 'sha256': ...})``; the SHA-256
covers everything the loader reads (format, record and tensors: :func:`iseg_plugin.files.content_digest`),
so that a file changed anywhere is refused or loads as written (files before v4: the tensors only).
INT4 weights (``Linear`` / ``Conv2d`` ``weight_bits == 4``) are stored packed two a byte (``intops.pack_int4``; the
record's ``packed_int4`` gives each one's shape) and unpacked to int8 on loading. The record also carries the
per-layer choices of the model (``selection``: the table of :mod:`iseg_plugin.select`, or None).
The record lists the lowered graph's nodes (op, target by name, arguments as plain values and node
references) and its modules (class names of :mod:`iseg_plugin.ops.modules`, their plain attributes,
buffer names, children). Loading uses ``torch.load(weights_only=True)``, resolves targets and classes
only from allowlists (the registry's modules and shape ops), and checks the checksum first:
a file is data, never code, and a damaged file is refused whole.
"""
from __future__ import annotations

import hashlib
import operator
import warnings
from pathlib import Path

import torch
from torch import fx, nn

from .. import intops
from ..files import atomic_write, content_digest, load_data
from ..ops import REGISTRY
from ..ops import modules as M
from .segmenter import DeployedSegmenter

FORMAT = "iseg-deployed-v4"
# v3 added packed INT4 weights and the selection record, v4 the checksum of the whole content
TENSOR_CHECKSUM_ONLY = ("iseg-deployed-v2", "iseg-deployed-v3")
READABLE = (*TENSOR_CHECKSUM_ONLY, FORMAT)
# the deployed modules of the registry (every nn.Module class defined in ops/modules.py) and two containers
_CLASSES = {name: cls for name, cls in vars(M).items()
            if isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__ == M.__name__}
_CLASSES.update(ModuleList=nn.ModuleList, Identity=nn.Identity)
_DTYPES = {str(d): d for d in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool)}


def _target_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return str(target)  # e.g. "aten.reshape.default"
    return f"{target.__module__}.{target.__qualname__}"


def _functions() -> dict:
    """The functions a lowered graph may call: the shape ops of the registry (and getitem)."""
    allowed = [operator.getitem]
    for name in ("shape", "split"):
        allowed += [*REGISTRY[name].functions, *REGISTRY[name].aten]
    return {_target_name(f): f for f in allowed}


def _methods() -> set[str]:
    return set(REGISTRY["shape"].methods) | set(REGISTRY["split"].methods)


class DeployedFileError(ValueError):
    """A file that is not a deployed iseg model (or is damaged)."""


def _encode(value):
    """A plain, ``weights_only``-loadable form of an argument or attribute (tuples, slices and dtypes
    tagged so they come back as themselves)."""
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, slice):
        return {"slice": [_encode(value.start), _encode(value.stop), _encode(value.step)]}
    if value is Ellipsis:
        return {"ellipsis": True}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value)}
    if isinstance(value, dict):
        return {"dict": {k: _encode(v) for k, v in value.items()}}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"a deployed model cannot store a {type(value).__name__} ({value!r})")


def _decode(value, nodes: dict):
    if isinstance(value, list):
        return [_decode(v, nodes) for v in value]
    if not isinstance(value, dict):
        return value
    if "node" in value:
        if value["node"] not in nodes:
            raise DeployedFileError(f"the graph uses node {value['node']!r} before defining it")
        return nodes[value["node"]]
    if "tuple" in value:
        return tuple(_decode(v, nodes) for v in value["tuple"])
    if "slice" in value:
        return slice(*(_decode(v, nodes) for v in value["slice"]))
    if "ellipsis" in value:
        return Ellipsis
    if "dtype" in value:
        if value["dtype"] not in _DTYPES:
            raise DeployedFileError(f"dtype {value['dtype']!r} is not an integer dtype")
        return _DTYPES[value["dtype"]]
    if "dict" in value:
        return {k: _decode(v, nodes) for k, v in value["dict"].items()}
    raise DeployedFileError(f"unknown value record {sorted(value)}")


def module_spec(module: nn.Module) -> dict:
    """The plain-data record of a deployed module (class name, attributes, buffer names, children)."""
    attrs = {k: _encode(v) for k, v in vars(module).items()
             if not k.startswith("_") and k != "training" and not isinstance(v, (nn.Module, torch.Tensor))}
    return {"type": type(module).__name__, "attrs": attrs,
            "buffers": sorted(k for k, v in module._buffers.items() if v is not None),
            "none_buffers": sorted(k for k, v in module._buffers.items() if v is None),
            "children": {name: module_spec(child) for name, child in module._modules.items()}}


def _build(spec: dict, state: dict, prefix: str) -> nn.Module:
    cls = _CLASSES.get(spec.get("type"))
    if cls is None:
        raise DeployedFileError(f"unknown module type {spec.get('type')!r} at '{prefix}'")
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    for key, value in spec["attrs"].items():
        setattr(module, key, _decode(value, {}))
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


def module_from_spec(spec: dict, state: dict) -> nn.Module:
    """Rebuild a deployed module from :func:`module_spec` and its integer state dict (allowlisted classes only)."""
    return _build(spec, state, "")


def _graph_record(gm: fx.GraphModule) -> dict:
    functions = {f: name for name, f in _functions().items()}
    nodes = []
    for node in gm.graph.nodes:
        target = node.target
        if node.op == "call_function":
            if target not in functions:
                raise ValueError(f"{node.name}: {target} is not an op a deployed file can hold")
            target = functions[target]
        nodes.append({"op": node.op, "name": node.name, "target": target,
                      "args": _encode(node.args), "kwargs": _encode(dict(node.kwargs))})
    modules = {name: module_spec(child) for name, child in gm.named_children()}
    constants = sorted(name for name, _ in gm.named_buffers(recurse=False))
    return {"nodes": nodes, "modules": modules, "constants": constants}


def _graph_from_record(record: dict, state: dict) -> fx.GraphModule:
    root = nn.Module()
    for name, spec in record["modules"].items():
        root.add_module(name, _build(spec, state, f"graph.{name}."))
    for name in record["constants"]:
        tensor = state.get(f"graph.{name}")
        if not isinstance(tensor, torch.Tensor) or tensor.dtype.is_floating_point:
            raise DeployedFileError(f"missing or non-integer constant 'graph.{name}'")
        root.register_buffer(name, tensor)
    functions, methods = _functions(), _methods()
    graph, nodes = fx.Graph(), {}
    for n in record["nodes"]:
        op, target = n["op"], n["target"]
        args, kwargs = _decode(n["args"], nodes), _decode(n["kwargs"], nodes)
        if op == "call_function":
            if target not in functions:
                raise DeployedFileError(f"node {n['name']!r} calls {target!r}, which is not an allowed integer op")
            target = functions[target]
        elif op == "call_method" and target not in methods:
            raise DeployedFileError(f"node {n['name']!r} calls method {target!r}, which is not an allowed integer op")
        elif op in ("call_module", "get_attr") and not hasattr(root, target):
            raise DeployedFileError(f"node {n['name']!r} refers to {target!r}, which the file does not hold")
        elif op not in ("placeholder", "output", "call_module", "get_attr", "call_method"):
            raise DeployedFileError(f"node {n['name']!r} has an unknown kind {op!r}")
        node = graph.create_node(op, target, tuple(args), kwargs, name=n["name"])
        nodes[n["name"]] = node
    return fx.GraphModule(root, graph, class_name="IntegerModel")


def _tensor_checksum(state: dict) -> str:
    """The checksum of files before v4 (their tensors only)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].reshape(-1)
        digest.update(f"{key}:{state[key].dtype}:{tuple(state[key].shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _int4_weights(model: DeployedSegmenter) -> list[str]:
    """State-dict keys of the INT4 weights (Linear / Conv2d modules with ``weight_bits`` 4)."""
    return [f"graph.{name}.{'weight_t' if isinstance(m, M.Linear) else 'weight'}"
            for name, m in model.graph.named_modules()
            if isinstance(m, (M.Linear, M.Conv2d)) and getattr(m, "weight_bits", 8) == 4]


def _unpack(state: dict, packed: dict) -> None:
    for key, shape in packed.items():
        tensor = state.get(key)
        numel = int(torch.Size(shape).numel())
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.uint8 or tensor.numel() != (numel + 1) // 2:
            raise DeployedFileError(f"packed INT4 weight {key!r} is missing or not {(numel + 1) // 2} bytes")
        state[key] = intops.unpack_int4(tensor, numel).reshape(shape)


def deployed_blob(model: DeployedSegmenter) -> dict:
    """What a deployed model file holds (with its per-layer ``selection`` table, plain data); its
    ``sha256`` is the model's digest, to which its calibration record is bound."""
    state = model.state_dict()
    floats = [k for k, v in state.items() if v.dtype.is_floating_point]
    if floats:
        raise ValueError(f"a deployed model holds integers only; float tensors found: {floats[:3]}")
    packed = {key: list(state[key].shape) for key in _int4_weights(model)}
    state.update({key: intops.pack_int4(state[key]) for key in packed})
    record = {"input_size": list(model.input_size), "logit_scale": model.logit_scale,
              "graph": _graph_record(model.graph), "packed_int4": packed, "selection": _encode(model.selection)}
    return {"format": FORMAT, "model": record, "state_dict": state, "sha256": content_digest([FORMAT, record], state)}


def save_deployed(model: DeployedSegmenter, path: str | Path) -> int:
    """Write the model (:func:`deployed_blob`); returns the file size in bytes."""
    blob = deployed_blob(model)
    return atomic_write(path, lambda tmp: torch.save(blob, tmp)).stat().st_size


def load_deployed(path: str | Path) -> DeployedSegmenter:
    """Read a deployed model written by :func:`save_deployed` (safe loader; clear errors)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no deployed model at {path}")
    blob = load_data(path, "deployed model", DeployedFileError)
    if isinstance(blob, dict) and str(blob.get("format", "")).startswith("iseg-deployed-") and blob["format"] not in READABLE:
        raise DeployedFileError(f"{path} is a {blob['format']} file, which this version cannot read: write it "
                                f"again with `iseg ptq` (this version writes {FORMAT})")
    if not isinstance(blob, dict) or blob.get("format") not in READABLE:
        raise DeployedFileError(f"{path} is not an iseg deployed model (format {FORMAT!r} expected)")
    if blob.get("sha256") != _digest(blob):
        raise DeployedFileError(f"{path} is damaged: its content does not match the checksum written with it "
                                "(write it again with `iseg ptq`, or copy it again)")
    if blob["format"] in TENSOR_CHECKSUM_ONLY:
        warnings.warn(f"{path} is a {blob['format']} file, whose checksum covers its tensors only: write it again "
                      f"with `iseg ptq` ({FORMAT}: the whole file is checked)", stacklevel=2)
    state, record = blob["state_dict"], blob["model"]
    _unpack(state, record.get("packed_int4", {}))
    graph = _graph_from_record(record["graph"], state)
    selection = _decode(record.get("selection"), {})
    model = DeployedSegmenter(graph, tuple(record["input_size"]), record["logit_scale"], selection).eval()
    model.sha256 = blob["sha256"]  # the digest its calibration record is bound to
    return model


def _digest(blob: dict) -> str | None:
    """The checksum of a loaded file's content, as its format computes it; None if it has no such parts."""
    state = blob.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return None
    if blob["format"] in TENSOR_CHECKSUM_ONLY:
        return _tensor_checksum(state)
    try:
        return content_digest([blob["format"], blob.get("model")], state)
    except (TypeError, ValueError):  # a record that is not plain data
        return None

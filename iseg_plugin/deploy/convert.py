"""The quantized and deployed Segmenter, derived from the float one by the per-op quantization.

``prepare_segmenter``: torch.ao's ``prepare_fx`` with the registry's configs over the float
segmentor's logits forward (an observer after every op; the fake-quant model to calibrate).
``calibrate_prepared``: runs it on images, as mmseg's data preprocessor prepares them.
``convert``: the lowering of the calibrated graph for one image size, uint8 pixels in.
"""
from __future__ import annotations

import warnings

import torch
from mmengine.utils import ProgressBar
from torch import Tensor, fx, nn

from .. import fx as fxp

from ..lowering import lower, static_nodes
from ..ops.observer import IsegObserver
from .segmenter import DeployedSegmenter


def prepare_segmenter(segmentor: nn.Module, example: Tensor, gelu: str | None = None, softmax: str | None = None,
                      momentum: float | None = None, weight_bits: int = 8) -> fx.GraphModule:
    """The observed (fake-quant) logits forward of a float mmseg segmentor; ``example``: a normalised batch."""
    return fxp.prepare(segmentor.eval(), (example,), gelu=gelu, softmax=softmax, momentum=momentum,
                       weight_bits=weight_bits)


class CalibrationWarning(UserWarning):
    """Calibration data from which no useful ranges can come (a flat image, a range of one value)."""


FLAT_STD = 3.0  # an image whose every channel's std is below this many grey levels is near-constant


def calibrate_prepared(prepared, preprocessor, loader, num_samples: int, show_progress: bool = True,
                       train_padding: bool = False, strict: bool = False) -> int:
    """Run ``num_samples`` images of ``loader`` (mmseg data dicts) through the observers of ``prepared`` (the
    prepared graph, or any callable that observes a normalised batch); returns the count. ``train_padding``
    pads batches as mmseg's training does (to the crop size) instead of as its testing does.

    Near-constant images and observed ranges that collapse to one value (named by the op observed) get a
    :class:`CalibrationWarning`, or a ``ValueError`` with ``strict``."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    seen, flat = 0, []
    bar = ProgressBar(num_samples) if show_progress else None
    with torch.no_grad():
        for data in loader:
            inputs = preprocessor(data, train_padding)["inputs"][: num_samples - seen]
            prepared(inputs)
            # each image's most varied channel, on its pixels as read (the batch's padding is constant)
            stds = [image.float().flatten(1).std(-1).max() for image in data["inputs"][: inputs.shape[0]]]
            flat += [seen + 1 + i for i, std in enumerate(stds) if std < FLAT_STD]
            seen += inputs.shape[0]
            for _ in range(inputs.shape[0] if bar is not None else 0):
                bar.update()
            if seen >= num_samples:
                break
    if seen == 0:
        raise ValueError("the calibration set is empty: check the dataset's data_root and split")
    problems = []
    if flat:
        which = f"image {flat[0]} of {seen} is" if len(flat) == 1 else f"images {', '.join(map(str, flat[:5]))} of {seen} are"
        problems.append(f"calibration {which} (near) constant: the ranges observed on it do not fit real images; "
                        "calibrate on real, varied images")
    collapsed = collapsed_ranges(prepared)
    if collapsed:
        problems.append(f"the observed range of {len(collapsed)} ops collapsed to one value ({', '.join(collapsed[:4])}"
                        f"{', ...' if len(collapsed) > 4 else ''}); calibrate on more, varied images")
    for problem in problems:
        if strict:
            raise ValueError(f"{problem} (refused: --strict)")
        warnings.warn(problem, CalibrationWarning, stacklevel=2)
    return seen


def collapsed_ranges(prepared) -> list[str]:
    """The ops of a prepared graph that depend on the image but whose observed range is a single value, by
    name (ops of the parameters alone, e.g. a zero class token, are constants: exact on one value)."""
    if not isinstance(prepared, fx.GraphModule):
        return []
    static = static_nodes(prepared.graph)  # what does not depend on the image's values
    modules = dict(prepared.named_modules())
    names = []
    for node in prepared.graph.nodes:
        observer = modules.get(node.target) if node.op == "call_module" else None
        observed = node.args[0] if node.args else None
        if (isinstance(observer, IsegObserver) and isinstance(observed, fx.Node) and observed not in static
                and observer.calibrated() and bool(observer.max_val.max() == observer.min_val.min())):
            names.append(observed.name)
    return names


def convert(prepared: fx.GraphModule, example: Tensor, mean, std, selection: list[dict] | None = None) -> DeployedSegmenter:
    """The integer-only Segmenter for ``example``'s image size (a normalised, unpadded (1, 3, H, W) image):
    the float model's own padding to the patch runs on the integers, after the pixels' quantization.
    ``selection``: the table of the per-layer choices made on ``prepared`` (kept with the model)."""
    with torch.no_grad():
        graph = lower(prepared, (example,), pixels=dict(mean=mean, std=std))
    (scale,) = graph.output_scales
    return DeployedSegmenter(graph, tuple(example.shape[-2:]), scale, selection)

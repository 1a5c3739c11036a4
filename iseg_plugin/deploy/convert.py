"""The quantized and deployed Segmenter, derived from the float one by the per-op quantization.

``prepare_segmenter``: torch.ao's ``prepare_fx`` with the registry's configs over the float
segmentor's logits forward (an observer after every op; the fake-quant model to calibrate).
``calibrate_prepared``: runs it on images, as mmseg's data preprocessor prepares them.
``convert``: the lowering of the calibrated graph for one image size, uint8 pixels in.
"""
from __future__ import annotations

import torch
from mmengine.utils import ProgressBar
from torch import Tensor, fx, nn

import fx_patterns as fxp

from ..lowering import lower
from .segmenter import DeployedSegmenter


def prepare_segmenter(segmentor: nn.Module, example: Tensor, gelu: str = "poly", softmax: str = "bit-exp",
                      momentum: float = 0.05, weight_bits: int = 8) -> fx.GraphModule:
    """The observed (fake-quant) logits forward of a float mmseg segmentor; ``example``: a normalised batch."""
    return fxp.prepare(segmentor.eval(), (example,), gelu=gelu, softmax=softmax, momentum=momentum,
                       weight_bits=weight_bits)


def calibrate_prepared(prepared, preprocessor, loader, num_samples: int, show_progress: bool = True,
                       train_padding: bool = False) -> int:
    """Run ``num_samples`` images of ``loader`` (mmseg data dicts) through the observers of ``prepared`` (the
    prepared graph, or any callable that observes a normalised batch); returns the count. ``train_padding``
    pads batches as mmseg's training does (to the crop size) instead of as its testing does."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    seen = 0
    bar = ProgressBar(num_samples) if show_progress else None
    with torch.no_grad():
        for data in loader:
            inputs = preprocessor(data, train_padding)["inputs"][: num_samples - seen]
            prepared(inputs)
            seen += inputs.shape[0]
            for _ in range(inputs.shape[0] if bar is not None else 0):
                bar.update()
            if seen >= num_samples:
                break
    if seen == 0:
        raise ValueError("the calibration set is empty: check the dataset's data_root and split")
    return seen


def convert(prepared: fx.GraphModule, example: Tensor, mean, std, selection: list[dict] | None = None) -> DeployedSegmenter:
    """The integer-only Segmenter for ``example``'s image size (a normalised, unpadded (1, 3, H, W) image):
    the float model's own padding to the patch runs on the integers, after the pixels' quantization.
    ``selection``: the table of the per-layer choices made on ``prepared`` (kept with the model)."""
    with torch.no_grad():
        graph = lower(prepared, (example,), pixels=dict(mean=mean, std=std))
    (scale,) = graph.output_scales
    return DeployedSegmenter(graph, tuple(example.shape[-2:]), scale, selection)

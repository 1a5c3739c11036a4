"""The deployed integer-only Segmenter: uint8 pixels in, integer logits and a class map out.

It is the lowering (:mod:`iseg_plugin.lowering`) of the float Segmenter's logits forward, for one
input size, plus the step mmseg's post-processing does: the logits cropped to the image and their
argmax. Nothing in it is written for the Segmenter: every operator is a registry module.
"""
from __future__ import annotations

import copy
import weakref

import numpy as np
import torch
from torch import Tensor, fx, nn

from .. import kernels
from ..ops.modules import Upsample


def as_pixels(images) -> Tensor:
    """A numpy uint8 RGB image (H, W, 3) or batch (N, H, W, 3), as images are read, as a (N, 3, H, W)
    tensor; a tensor is returned as it is."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or images.shape[-1] != 3:
            raise TypeError(f"a numpy image for the deployed model must be uint8 RGB (H, W, 3) or (N, H, W, 3), "
                            f"got {images.dtype} {images.shape}")
        batch = torch.from_numpy(np.ascontiguousarray(images.reshape(-1, *images.shape[-3:])))
        return batch.permute(0, 3, 1, 2).contiguous()
    return images


def check_pixels(images: Tensor, input_size: tuple[int, int]) -> None:
    """A deployed model's input must be uint8 RGB pixels (B, 3, H, W) of the size it was built for."""
    if not isinstance(images, Tensor) or images.dtype != torch.uint8:
        got = images.dtype if isinstance(images, Tensor) else type(images).__name__
        raise TypeError(
            f"the deployed model takes uint8 RGB pixels, a (B, 3, H, W) tensor or a numpy (H, W, 3) array, got "
            f"{got}: pass the image before any normalisation (mean and std are folded into the model)"
        )
    if images.dim() != 4 or images.shape[0] == 0 or images.shape[1] != 3 or tuple(images.shape[-2:]) != tuple(input_size):
        raise ValueError(
            f"the deployed model was built for (B >= 1, 3, {input_size[0]}, {input_size[1]}) images, got "
            f"{tuple(images.shape)}: resize or pad the image, or convert the model for this size"
        )


class DeployedSegmenter(nn.Module):
    """Integer-only Segmenter for one input size: ``forward(uint8 (B, 3, H, W) RGB)`` returns
    ``(logits, classes)``: the integer logits (B, K, H', W') at the padded size (H, W rounded up to the
    patch, as the float model pads) and the int64 class map (B, H, W).

    ``graph``: the lowered GraphModule (uint8 pixels in, integer logits out, ``logit_scale`` their real
    scale). :meth:`fake_quant` runs the same graph on float64 tensors holding integers: every module
    then takes the float path of the same ``intops`` functions (the form QAT trains through).
    ``selection``: the per-layer choices it was built with (:mod:`iseg_plugin.select`'s table), if any.
    """

    def __init__(self, graph: fx.GraphModule, input_size: tuple[int, int], logit_scale: float,
                 selection: list[dict] | None = None):
        super().__init__()
        self.graph = graph
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.logit_scale = float(logit_scale)
        self.selection = selection

    def _run(self, images: Tensor, logits: bool = True):
        """(logits, classes), or the classes alone without ``logits``. The graph is lowered for one image (shapes are
        folded into it): a batch runs image by image. Where the graph ends with an upsampling of its logits (the
        Segmenter's resize to the image) and the kernels run, the upsampling and the argmax are one pass
        (:func:`kernels.upsample_class_map`): the full-size logits (150 x 512 x 512 int16: 78 MB per image) are
        written once and not read back, or not written at all for the classes alone."""
        split = self._split_last_upsample() if kernels.use(images) else None
        outs = [self._one(image[None], split, logits) for image in images]
        if not logits:
            return outs[0] if len(outs) == 1 else torch.cat(outs)
        full, classes = zip(*outs)  # (one image: no copy of the full-size logits)
        return (full[0], classes[0]) if len(outs) == 1 else (torch.cat(full), torch.cat(classes))

    def _one(self, image: Tensor, split, logits: bool):
        """One image's (logits, classes), or classes (see :meth:`_run`); ``split``: the graph split at its last
        upsampling, or None."""
        if split is not None:
            trunk, up = split
            low = trunk(image)
            if low.dtype in (torch.int8, torch.int16, torch.int32):
                return kernels.upsample_class_map(low, up.mode, up.size, bool(up.align_corners), self.input_size, logits)
            full = up(low)
        else:
            full = self.graph(image)
        if full.dtype in (torch.int8, torch.int16, torch.int32) and kernels.use(full):
            classes = kernels.class_map(full, self.input_size)
        else:
            classes = full[..., : self.input_size[0], : self.input_size[1]].argmax(1)
        return (full, classes) if logits else classes

    def forward(self, images: Tensor | np.ndarray) -> tuple[Tensor, Tensor]:
        images = as_pixels(images)
        check_pixels(images, self.input_size)
        return self._run(images)

    def predict(self, images: Tensor | np.ndarray) -> Tensor:
        """The class map (B, H, W) alone: ``forward(images)[1]``, the same integers, without the full-size logits
        where the graph ends with their upsampling (see :meth:`_run`)."""
        images = as_pixels(images)
        check_pixels(images, self.input_size)
        return self._run(images, logits=False)

    def _split_last_upsample(self):
        """(the graph up to its output's upsampling, that Upsample module) where the output is one Upsample of its
        own grid (no requantization), else None; built once per graph (a cache, not state)."""
        built_for = getattr(self, "_split_of", None)  # (a weak reference: the graph is not registered twice)
        if built_for is None or built_for() is not self.graph:
            self._split, self._split_of = None, weakref.ref(self.graph)
            out = next(node for node in self.graph.graph.nodes if node.op == "output")
            last = out.args[0]
            if isinstance(last, fx.Node) and last.op == "call_module":
                up = self.graph.get_submodule(str(last.target))
                if isinstance(up, Upsample) and up.out is None and len(last.users) == 1:
                    trunk = copy.deepcopy(self.graph.graph)
                    trunk_out = next(node for node in trunk.nodes if node.op == "output")
                    trunk_last = trunk_out.args[0]
                    trunk_out.args = (trunk_last.args[0],)
                    trunk.erase_node(trunk_last)
                    self._split = (fx.GraphModule(self.graph, trunk), up)
        return self._split

    def fake_quant(self, images: Tensor | np.ndarray) -> tuple[Tensor, Tensor]:
        images = as_pixels(images)
        check_pixels(images, self.input_size)
        return self._run(images.double())

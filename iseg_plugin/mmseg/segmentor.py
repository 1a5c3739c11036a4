"""``ISegmenter``: mmseg's ``EncoderDecoder`` whose forward is the integer-only Segmenter when ``quant`` is set.

The integer model is not written here: it is the per-op lowering of this float segmentor
(``fx_patterns.prepare`` over its logits forward, then :func:`iseg_plugin.lowering.lower`), the same
as ``iseg ptq`` builds. With ``quant=dict(gelu=..., softmax=...)`` (and ``weight_bits``, ``select``,
``size_ratio``: :func:`iseg_plugin.select.check_quant`):

* ``__init__`` traces the float model and inserts the registry's observers (mmengine builds the
  optimizer before any hook runs, so the parameters must not change later: the traced graph shares
  the float modules, and the observers are a submodule, ``observers``, saved in checkpoints);
* :meth:`observe` runs images through the observers (the ``CalibrationHook``'s PTQ calibration), then
  :meth:`choose_layers` makes the per-layer choices the ``quant`` dict asks for (unified metric);
* training (``mode='loss'``): each step lowers the graph in its trainable form, runs it on the batch's
  pixels (float64 holding integers) and takes mmseg's losses of its logits; the straight-through
  gradients reach the float parameters (QAT). Until the ``QATHook`` freezes them, the observers
  follow the float model's activations on each batch (the hook's EMA);
* ``distill=dict(weight=1.0, temperature=1.0)`` adds a distillation loss (``decode.loss_kd``): the KL
  divergence of the integer model's class distribution per pixel from the float model's (with
  ``class_weight=[...]``, one per class: a mean over the labelled pixels weighted by their label's class, as
  torch's ``F.cross_entropy(weight=...)`` averages), the float model
  being a frozen copy of this one as it was before QAT changed it: at the calibration for training, before
  GPTQ sets the trained INT4 weights to its integers, else at the first training step (``load_from``: the
  FP32 checkpoint; on ``--resume``, the resumed weights). The labels' loss stays (its weight: ``loss_decode``'s);
* evaluation (``predict`` / ``tensor``): the deployed integer-only model (uint8 pixels in, integer
  logits out), lowered once per input size and kept until the model trains or loads a checkpoint.

Both forms give the same integers (tested). mmseg's post-processing (resize to the image, argmax) and
losses run on the logits' real values.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from mmseg.models.segmentors import EncoderDecoder
from mmseg.models.utils import resize
from mmseg.utils import add_prefix
from torch import Tensor, nn

from .. import fx as fxp

from ..deploy.convert import convert
from ..deploy.segmenter import DeployedSegmenter
from ..lowering import lower
from ..ops.observer import IsegObserver
from ..select import check_quant, choose, prepare_options

def _stochastic_layers(model: nn.Module) -> list[str]:
    """Modules that drop activations in training: the integer model has none."""
    return [name for name, m in model.named_modules()
            if (isinstance(m, nn.Dropout) and m.p > 0) or getattr(m, "drop_prob", 0.0) > 0]


def _check_distill(distill: dict | None, num_classes: int) -> dict | None:
    if distill is None:
        return None
    unknown = set(distill) - {"weight", "temperature", "class_weight"}
    if unknown:
        raise ValueError(f"distill takes weight, temperature and class_weight, not {sorted(unknown)}")
    options = {"weight": 1.0, "temperature": 1.0, "class_weight": None, **distill}
    if not (options["weight"] > 0 and options["temperature"] > 0):
        raise ValueError(f"distill weight and temperature must be positive, got {options}")
    weights = options["class_weight"]
    if weights is not None and (len(weights) != num_classes or not all(w > 0 for w in weights)):
        raise ValueError(f"distill class_weight needs one positive weight per class ({num_classes}), got {weights}")
    return options


class _FloatTeacher(nn.Module):
    """A frozen copy of a segmentor's float encoder, neck and decode head: its logits."""

    def __init__(self, segmentor: EncoderDecoder):
        super().__init__()
        self.backbone = copy.deepcopy(segmentor.backbone)
        self.neck = copy.deepcopy(segmentor.neck) if segmentor.with_neck else nn.Identity()
        self.decode_head = copy.deepcopy(segmentor.decode_head)
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, inputs: Tensor) -> Tensor:
        return self.decode_head(self.neck(self.backbone(inputs)))


class ISegmenter(EncoderDecoder):
    """EncoderDecoder for the plugin's Segmenter; the integer-only Segmenter with ``quant=dict(...)``."""

    def __init__(self, backbone: dict, decode_head: dict, quant: dict | None = None, distill: dict | None = None,
                 **kwargs):
        super().__init__(backbone=backbone, decode_head=decode_head, **kwargs)
        self.quant = None if quant is None else check_quant(quant)
        self.distill = _check_distill(distill, self.decode_head.num_classes)
        if self.distill is not None and self.quant is None:
            raise ValueError("distill=... is for QAT: set quant=dict(...) too, or remove distill")
        self._teacher: _FloatTeacher | None = None  # made before QAT changes the float weights (distill)
        self.observe_in_training = False  # the QATHook's warm-up switch
        self._deployed: dict[tuple[int, ...], DeployedSegmenter] = {}
        if self.quant is not None:
            self._prepare()

    def _prepare(self) -> None:
        if self.with_auxiliary_head:
            raise ValueError("ISegmenter(quant=...) has no integer auxiliary head: remove auxiliary_head")
        dropping = _stochastic_layers(self)
        if dropping:
            raise ValueError(f"the integer-only Segmenter has no dropout or drop-path; set the rates to 0 "
                             f"(drop_rate, attn_drop_rate, drop_path_rate): {dropping[:3]}")
        example = torch.zeros(1, 3, *self.backbone.img_size)
        was_training = self.training
        self.eval()  # traced as evaluated: no dropout
        prepared = fxp.prepare(self, (example,), **prepare_options(self.quant))
        self.train(was_training)
        # the traced graph shares the float modules: kept out of the module tree (no duplicate parameters)
        object.__setattr__(self, "_prepared", prepared)
        self.observers = nn.ModuleDict(
            {name: m for name, m in prepared.named_children() if isinstance(m, IsegObserver)})

    # -- what hooks and tools call ---------------------------------------------------------------

    @property
    def prepared(self):
        """The observed graph of this float model (it shares its modules); its state dict is the calibration
        record ``iseg eval`` rebuilds the fake-quant form from."""
        self._require_quant()
        return self._prepared

    @torch.no_grad()
    def observe(self, inputs: Tensor) -> None:
        """Update the activation ranges from a batch of normalised images (calibration; the observers' rule:
        :meth:`set_momentum`)."""
        self._require_quant()
        self._prepared(inputs)
        self._forget_deployed()

    def choose_layers(self, inputs: Tensor, for_training: bool = False) -> list[dict] | None:
        """The per-layer choices of ``quant`` (``select='unified'``, ``weight_bits='mixed'``), scored on a batch of
        normalised calibration images, and GPTQ of INT4 weights on them (``for_training``, before QAT: the trained
        weights start at GPTQ's integers) (:func:`iseg_plugin.select.choose`); written into the observers, so checkpoints
        keep them. Returns the table rows (None: nothing is chosen per layer)."""
        self._require_quant()
        if for_training and self.distill is not None and self._teacher is None:
            self._keep_teacher()  # the float weights, before GPTQ rounds the trained ones
        images = [(image[None],) for image in inputs]
        rows = choose(self._prepared, images, self.quant, rounding_inputs=images, for_training=for_training)
        self._forget_deployed()
        return rows

    def set_momentum(self, momentum: float | None) -> None:
        """The observers' range rule: None, the extremes of every value seen (calibration); a number, an EMA with
        that update weight (QAT's warm-up)."""
        for observer in self.observers.values():
            observer.momentum = momentum

    def deploy(self, input_size: tuple[int, int]) -> DeployedSegmenter:
        """The integer-only Segmenter for ``input_size`` (H, W) images: uint8 pixels in."""
        self._require_quant()
        return convert(self._prepared, torch.zeros(1, 3, *input_size), *self._normalisation())

    # -- mmseg's forward modes -------------------------------------------------------------------

    def loss(self, inputs: Tensor, data_samples) -> dict:
        if self.quant is None:
            return super().loss(inputs, data_samples)
        logits = self.integer_logits(inputs)
        losses = add_prefix(self.decode_head.loss_by_feat(logits, data_samples), "decode")
        if self.distill is not None:
            losses["decode.loss_kd"] = self._distillation_loss(inputs, logits, data_samples)
        return losses

    def _keep_teacher(self) -> None:
        object.__setattr__(self, "_teacher", _FloatTeacher(self))  # not a submodule: not trained, not saved

    def _distillation_loss(self, inputs: Tensor, logits: Tensor, data_samples) -> Tensor:
        """Mean KL(float || integer) of the per-pixel class distributions (at temperature T, times T^2 as in
        Hinton et al.) over the labelled pixels (the head's ``ignore_index`` and padding are left out),
        weighted by the class of each pixel's label with ``class_weight``."""
        if self._teacher is None:
            self._keep_teacher()
        labels = torch.stack([sample.gt_sem_seg.data for sample in data_samples])[:, 0]
        student = resize(logits, size=labels.shape[-2:], mode="bilinear", align_corners=self.align_corners)
        teacher = resize(self._teacher(inputs), size=labels.shape[-2:], mode="bilinear",
                         align_corners=self.align_corners)
        t = self.distill["temperature"]
        divergence = F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True,
                              reduction="none").sum(1)
        keep = labels != self.decode_head.ignore_index
        weights = keep.to(divergence.dtype)
        if self.distill["class_weight"] is not None:
            weights = weights * divergence.new_tensor(self.distill["class_weight"])[torch.where(keep, labels, 0)]
        return self.distill["weight"] * t * t * (divergence * weights).sum() / weights.sum().clamp(min=1e-12)

    def encode_decode(self, inputs: Tensor, batch_img_metas: list[dict]) -> Tensor:
        if self.quant is None:
            return super().encode_decode(inputs, batch_img_metas)
        return self.decode_head.predict_by_feat(self.integer_logits(inputs), batch_img_metas)

    def _forward(self, inputs: Tensor, data_samples=None) -> Tensor:
        return super()._forward(inputs, data_samples) if self.quant is None else self.integer_logits(inputs)

    def integer_logits(self, inputs: Tensor) -> Tensor:
        """The integer model's logits (their real values) for normalised images, as mmseg passes them."""
        pixels = self._pixels(inputs)
        if self.training:
            try:
                graph = lower(self._prepared, (inputs,), dict(zip(("mean", "std"), self._normalisation())),
                              trainable=True, observe=self.observe_in_training)
            except ValueError as err:  # the graph is relowered from the current weights at every step
                raise RuntimeError(f"QAT: the integer model of the current weights cannot be built ({err}); if "
                                   "earlier steps trained, the weights have diverged: lower the learning rate "
                                   "(optim_wrapper.optimizer.lr)") from err
            (scale,) = graph.output_scales
            return (graph(pixels) * scale).float()
        size = tuple(inputs.shape[-2:])
        if size not in self._deployed:
            self._deployed[size] = self.deploy(size)
        deployed = self._deployed[size]
        with torch.no_grad():
            logits, _ = deployed(pixels.to(torch.uint8))
        return (logits.double() * deployed.logit_scale).float()

    def train(self, mode: bool = True):
        self._forget_deployed()  # the parameters or ranges may change
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs):
        self._forget_deployed()
        super()._load_from_state_dict(*args, **kwargs)

    # -- helpers -----------------------------------------------------------------------------------

    def _forget_deployed(self) -> None:
        getattr(self, "_deployed", {}).clear()

    def _require_quant(self) -> None:
        if self.quant is None:
            raise ValueError("this ISegmenter is the float model: build it with quant=dict(gelu=..., softmax=...)")

    def _normalisation(self) -> tuple[Tensor, Tensor]:
        pre = self.data_preprocessor
        if getattr(pre, "_enable_normalize", False):
            return pre.mean.flatten().double(), pre.std.flatten().double()
        return torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)

    def _pixels(self, inputs: Tensor) -> Tensor:
        """The RGB pixels (float64 holding 0..255) behind mmseg's normalised batch (padding: the mean pixel)."""
        mean, std = self._normalisation()
        return torch.round(inputs.double() * std[:, None, None] + mean[:, None, None]).clamp_(0, 255)

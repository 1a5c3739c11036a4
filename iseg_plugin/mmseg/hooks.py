"""mmengine hooks: post-training calibration and the QAT range schedule."""
from __future__ import annotations

import copy
import hashlib

import numpy as np
from mmengine import dist
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer
from mmengine.model import is_model_wrapper

from ..deploy.convert import calibrate_prepared
from ..select import SCORE_IMAGES


def _unwrap(model):
    return model.module if is_model_wrapper(model) else model


def calibrate(model, dataloader, num_samples: int, momentum: float | None = None, show_progress: bool = True,
              train_padding: bool = False, for_training: bool = False) -> int:
    """Run ``num_samples`` images through the observers of an ``ISegmenter(quant=...)`` (range rule
    ``momentum``: None, the extremes of every image; a number, an EMA), in eval mode, then make the per-layer
    choices its ``quant`` asks for (scored on the first ``SCORE_IMAGES`` images) and GPTQ of its INT4 weights
    (``for_training``, before QAT: the trained ones start at GPTQ's integers and keep its scales). Returns the
    number of images seen.

    ``train_padding`` pads batches as in training (to the crop size: for loaders with the train
    pipeline's random crops); otherwise as in testing (e.g. to a multiple of the patch)."""
    model = _unwrap(model)
    if getattr(model, "quant", None) is None:
        raise ValueError("the model has no quantizers to calibrate: build ISegmenter with quant=dict(...)")
    was_training = model.training
    model.eval()
    model.set_momentum(momentum)
    first = []  # the first batch: the per-layer choices are scored on its images

    def observe(inputs):
        if not first:
            first.append(inputs)
        model.observe(inputs)

    try:
        seen = calibrate_prepared(observe, model.data_preprocessor, dataloader, num_samples, show_progress,
                                  train_padding)
        model.choose_layers(first[0][:SCORE_IMAGES], for_training)
        return seen
    finally:
        model.train(was_training)


class CalibrationHook(Hook):
    """Calibrate the quantized model on ``num_samples`` images before training or testing.

    The images come from their own finite loader (``DefaultSampler``, no shuffle) built from
    ``dataloader`` (default: the runner's train dataloader config with batch ``batch_size``):
    iterating the runner's ``InfiniteSampler`` loader here would exhaust it for training.
    ``pipeline='test'`` (default) reads them through the config's ``test_pipeline``, as ``iseg ptq``
    calibrates: whole, undistorted images, the same ones at every run. ``'train'`` keeps the loader's own
    pipeline (random crops and photometric distortion: on CamVid, ranges from one such crop left the W4A8
    model 7 mIoU lower after 50 QAT iterations than ranges from a whole image, docs/qat_diagnostics.md).
    I-Segmenter: one image (one-shot PTQ) or 500, batch 8, EMA update 0.05 (``momentum=0.05``; the default
    range is the extremes of every image, which one image gives alike: :class:`~iseg_plugin.ops.IsegObserver`).
    """

    priority = "VERY_HIGH"

    def __init__(self, num_samples: int = 1, batch_size: int = 8, momentum: float | None = None,
                 dataloader: dict | None = None, before: str = "train", pipeline: str = "test"):
        if before not in ("train", "val", "test"):
            raise ValueError(f"before must be 'train', 'val' or 'test', got {before!r}")
        if pipeline not in ("train", "test"):
            raise ValueError(f"pipeline must be 'test' (the config's test_pipeline) or 'train' (the loader's "
                             f"own), got {pipeline!r}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.momentum = momentum
        self.dataloader = dataloader
        self.before = before
        self.pipeline = pipeline

    def _loader_cfg(self, runner) -> dict:
        cfg = self.dataloader or runner.cfg.get("train_dataloader")
        if cfg is None:
            raise ValueError("CalibrationHook needs a dataloader: set train_dataloader or the hook's dataloader")
        cfg = copy.deepcopy(dict(cfg))
        if self.pipeline == "test":
            if runner.cfg.get("test_pipeline") is None:
                raise ValueError("CalibrationHook(pipeline='test') needs the config's test_pipeline: set it, "
                                 "or pass pipeline='train'")
            cfg["dataset"] = dict(cfg["dataset"], pipeline=copy.deepcopy(runner.cfg.test_pipeline))
        cfg.update(batch_size=min(self.batch_size, self.num_samples), sampler=dict(type="DefaultSampler",
                                                                                   shuffle=False),
                   persistent_workers=False)
        return cfg

    def _calibrate(self, runner) -> None:
        loader = runner.build_dataloader(self._loader_cfg(runner))
        if len(loader.dataset) < self.num_samples:
            raise ValueError(
                f"calibration asks for {self.num_samples} images but the dataset has {len(loader.dataset)}"
            )
        seen = calibrate(runner.model, loader, self.num_samples, self.momentum,
                         train_padding=self.pipeline == "train", for_training=self.before == "train")
        if self.before == "train":  # GPTQ set the trained INT4 weights from this process's own calibration images
            share_parameters(_unwrap(runner.model))
        rule = "the extremes of every image" if self.momentum is None else f"EMA update {self.momentum}"
        runner.logger.info(f"calibrated the quantized model on {seen} images (ranges: {rule})")

    def before_train(self, runner) -> None:
        if self.before == "train" and runner.iter == 0:  # a resumed run keeps its checkpoint's ranges and weights
            self._calibrate(runner)

    def before_val(self, runner) -> None:
        if self.before == "val":
            self._calibrate(runner)

    def before_test(self, runner) -> None:
        if self.before == "test":
            self._calibrate(runner)


class QATHook(Hook):
    """I-Segmenter's QAT range schedule: ranges follow an EMA (update 0.01) of the activations during the
    warm-up, then are frozen for the rest of training (the paper freezes after 10 warm-up epochs).

    The ranges observed are the float model's activations on each training batch (the integer model is
    built from them). Under DDP each process observes its own batches (DDP broadcasts rank 0's buffers
    before each forward); at the freeze every process takes rank 0's ranges, and the hook checks that
    they are identical everywhere before training goes on."""

    priority = "HIGH"

    def __init__(self, momentum: float = 0.01, freeze_iter: int = 1000):
        self.momentum = momentum
        self.freeze_iter = freeze_iter

    def before_train(self, runner) -> None:
        model = _unwrap(runner.model)
        model.set_momentum(self.momentum)
        model.observe_in_training = runner.iter < self.freeze_iter
        if not model.observe_in_training:  # freeze_iter 0 (the calibration's ranges) or resumed after it
            self._freeze(runner, model, runner.iter)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if runner.iter + 1 == self.freeze_iter:
            self._freeze(runner, _unwrap(runner.model), self.freeze_iter)

    @staticmethod
    def _freeze(runner, model, iterations: int) -> None:
        model.observe_in_training = False
        processes = share_ranges(model)
        runner.logger.info(f"QAT: activation ranges frozen after {iterations} iterations"
                           + (f" (identical on {processes} processes)" if processes > 1 else ""))


def share_ranges(model) -> int:
    """Give every process rank 0's observers (ranges, samples, per-layer choices) and check that they and
    the parameters now agree bit for bit (a digest of each process's state); returns the number of processes."""
    processes = dist.get_world_size()
    if processes == 1:
        return 1
    state = [model.observers.state_dict() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(state, src=0)
    model.observers.load_state_dict(state[0])
    parameters = {f"parameter.{name}": p for name, p in model.named_parameters()}
    digests = dist.all_gather_object(_digest({**model.observers.state_dict(), **parameters}))
    if len(set(digests)) != 1:
        raise RuntimeError(f"the activation ranges or parameters differ between processes after the freeze: {digests}")
    return processes


def share_parameters(model) -> None:
    """Give every process rank 0's parameters (after a calibration that changed them: DDP synchronised them
    only when it wrapped the model)."""
    if dist.get_world_size() > 1:
        for parameter in model.parameters():
            dist.broadcast(parameter.data, src=0)


def _digest(state: dict) -> str:
    sha = hashlib.sha256()
    for key in sorted(state):
        sha.update(key.encode())
        sha.update(state[key].detach().contiguous().numpy().tobytes())
    return sha.hexdigest()


_BUFFER_TAG = "__history_buffer__"


def _to_plain(obj):
    if isinstance(obj, HistoryBuffer):
        log, count = obj.data
        return {_BUFFER_TAG: True, "log": log.tolist(), "count": count.tolist(), "max_length": obj.max_length}
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_plain(v) for v in obj)
    return obj


def _from_plain(obj):
    if isinstance(obj, dict):
        if obj.get(_BUFFER_TAG):
            return HistoryBuffer(obj["log"], obj["count"], obj["max_length"])
        return {k: _from_plain(v) for k, v in obj.items()}
    return obj


class PlainCheckpointHook(Hook):
    """Keep checkpoints loadable by ``torch.load(weights_only=True)``.

    torch >= 2.6 loads checkpoints with the safe unpickler, which refuses the ``HistoryBuffer``
    objects and numpy arrays in mmengine's ``message_hub`` state: ``mim test`` then cannot read
    what ``mim train`` wrote. Rather than turning the safe loader off, this hook stores that state
    as plain lists when saving and rebuilds it when a checkpoint is loaded (for resuming).
    """

    priority = "VERY_LOW"

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if "message_hub" in checkpoint:
            checkpoint["message_hub"] = _to_plain(checkpoint["message_hub"])

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if "message_hub" in checkpoint:
            checkpoint["message_hub"] = _from_plain(checkpoint["message_hub"])

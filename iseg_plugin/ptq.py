"""Post-training quantization from an mmseg config: calibrate, convert, write the deployed model."""
from __future__ import annotations

import copy
import io
import time
from pathlib import Path

import torch
from mmengine.config import Config
from mmengine.dataset import pseudo_collate
from mmengine.logging import MMLogger
from mmengine.registry import init_default_scope
from mmseg.registry import DATASETS, MODELS
from torch.utils.data import DataLoader

from . import mmseg as _registered  # noqa: F401  (the plugin's models in mmseg's registry)
from .deploy import calibrate_prepared, convert, prepare_segmenter
from .deploy.io import deployed_blob
from .files import check_output, content_digest, load_data, sidecar, write_together
from .models import CheckpointMismatchError
from .models.fold import fold_layernorms
from .quiet import quiet
from .select import ROUNDING_IMAGES, SCORE_IMAGES, check_quant, choose, prepare_options

DECODERS = {"paper": dict(l2_norm=False, upsample="nearest"), "bilinear-l2": dict(l2_norm=True, upsample="bilinear")}


def save_with_record(deployed, state_dict: dict, meta: dict, out: str | Path, force: bool) -> int:
    """Write the deployed model and its calibration record (:func:`sidecar`: float weights, observed ranges,
    ``meta``) as one: the record holds the model's digest and its own checksum, and both files are moved
    into place together (:func:`iseg_plugin.files.write_together`). Returns the model's size in bytes."""
    blob = deployed_blob(deployed)
    record = {"state_dict": state_dict, "meta": meta, "model_sha256": blob["sha256"]}
    record["sha256"] = content_digest([meta, blob["sha256"]], state_dict)
    write_together([(sidecar(out), lambda tmp: torch.save(record, tmp)), (out, lambda tmp: torch.save(blob, tmp))],
                   replace=force)
    return Path(out).stat().st_size


def load_record(model_path: str | Path, model_sha256: str) -> dict:
    """The calibration record of the deployed model at ``model_path`` whose digest is ``model_sha256``
    (``load_deployed(...).sha256``): refused if damaged, unbound (earlier versions) or another model's."""
    path = sidecar(model_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: it is written by `iseg ptq` next to the deployed model")
    record = load_data(path, "calibration record of `iseg ptq`")
    if not isinstance(record, dict) or "model_sha256" not in record:
        raise ValueError(f"{path} is not bound to its model (written by an earlier version, or not a calibration "
                         "record): write the model and it again with `iseg ptq`")
    try:
        intact = record.get("sha256") == content_digest([record.get("meta"), record["model_sha256"]],
                                                        record.get("state_dict"))
    except (TypeError, ValueError, AttributeError, RuntimeError):  # parts that are not what they should be
        intact = False
    if not intact:
        raise ValueError(f"{path} is damaged: its content does not match the checksum written with it "
                         "(write the model and it again with `iseg ptq`)")
    if record["model_sha256"] != model_sha256:
        raise ValueError(f"{path} belongs to another model than {model_path} (one of them was written by another or "
                         f"an interrupted run): write both again with `iseg ptq ... --out {model_path} --force`")
    return record


def load_config(config: str, data_root: str | None = None, gelu: str | None = None, softmax: str | None = None,
                decoder: str | None = None, check_data: bool = True, **quant) -> Config:
    """The config with the CLI's overrides (``gelu`` / ``softmax``: registry variants; ``quant``: the other
    keys of ``model.quant``, e.g. ``weight_bits``, ``select``; None leaves the config's)."""
    try:
        cfg = Config.fromfile(config)
    except SyntaxError as err:  # (mmengine parses the text without its file name)
        where = err.filename if err.filename and not err.filename.startswith("<") else config
        raise ValueError(f"config {where}, line {err.lineno}: Python syntax error ({err.msg}): fix the "
                         "config file") from None
    init_default_scope(cfg.get("default_scope", "mmseg"))
    if data_root is not None:
        for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
            if loader in cfg:
                cfg[loader].dataset.data_root = data_root
        cfg.data_root = data_root
    if cfg.model.get("quant") is None:
        cfg.model.quant = {}
    for key, value in dict(quant, gelu=gelu, softmax=softmax).items():
        if value is not None:
            cfg.model.quant[key] = value
    if decoder is not None:
        if decoder not in DECODERS:
            raise ValueError(f"--decoder must be one of {sorted(DECODERS)}, got {decoder!r}")
        cfg.model.decode_head.update(DECODERS[decoder])
    root = Path(cfg.val_dataloader.dataset.data_root)
    if check_data and not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist: pass --data-root DIR (the folder with "
                                "train/, trainannot/, val/, valannot/)")
    return cfg


def quant_options(cfg: Config) -> dict:
    """The config's ``model.quant`` checked and completed (:func:`iseg_plugin.select.check_quant`)."""
    return check_quant(dict(cfg.model.get("quant") or {}))


def example_input(model, item: dict) -> torch.Tensor:
    """One image as the float model takes it (normalised, (1, 3, H, W)), without the batch padding."""
    inputs = model.data_preprocessor(dict(inputs=[item["inputs"]], data_samples=[item["data_samples"]]), False)["inputs"]
    h, w = item["inputs"].shape[-2:]
    return inputs[..., :h, :w]


def quiet_mmengine_info():
    """mmengine logs one INFO record per parameter in ``init_weights`` and every IoU table it computes
    (hundreds of lines before any result); the plugin's commands keep its warnings only."""
    return quiet(MMLogger.get_current_instance())


def load_fp32_checkpoint(model, checkpoint: str | Path) -> list[str]:
    """Load a float checkpoint (mmengine's ``{'state_dict': ...}`` or a bare state dict; DDP's
    ``module.`` prefixes dropped) with ``weights_only=True``; returns the model's keys it left as they
    were (e.g. the encoder of a decoder-only checkpoint keeps its pretrained init).

    Refused, naming what was found: a file that is no checkpoint, a deployed integer model, and a
    checkpoint none of whose tensors belongs to the model. (mmengine's ``load_checkpoint`` only logs
    mismatched keys, which leaves a randomly initialised model.)"""
    tensors = checkpoint_tensors(checkpoint)
    result = model.load_state_dict(tensors, strict=False)
    if len(result.missing_keys) == len(model.state_dict()):
        raise CheckpointMismatchError(f"none of the {len(tensors)} tensors of {checkpoint} belongs to this model "
                                      f"(its keys start {sorted(tensors)[:3]}): is it a checkpoint of this config?")
    return list(result.missing_keys)


def checkpoint_tensors(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of mmengine's ``{'state_dict': ...}`` or a bare state dict (``weights_only=True``; DDP's
    ``module.`` prefixes dropped); a missing file, a deployed model or a file without tensors is refused."""
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"no checkpoint at {checkpoint}")
    blob = load_data(checkpoint, "checkpoint", CheckpointMismatchError)
    if isinstance(blob, dict) and str(blob.get("format", "")).startswith("iseg-deployed"):
        raise CheckpointMismatchError(f"{checkpoint} is a deployed integer model ({blob['format']}), not a "
                                      "checkpoint: pass the checkpoint it was made from")
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    tensors = {k.removeprefix("module."): v for k, v in (state or {}).items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointMismatchError(f"{checkpoint} holds no tensors (expected {{'state_dict': {{name: tensor}}}})")
    check_finite(tensors, checkpoint)
    return tensors


ABSURD = 1e6  # no trained weight or bias comes near this; its integers' scales would overflow
# an observer's statistics (QAT checkpoints): energies are squares, and a range that saw no data is +-inf
OBSERVER_STATS = (".min_val", ".max_val", ".samples", ".channel_energy", ".weight_scale")


def check_finite(tensors: dict, checkpoint: str | Path) -> None:
    """Refuse NaN, infinite or absurdly large (|x| > ``ABSURD``) floats (observers' statistics: NaN), naming
    the first tensor that holds them: before any calibration, which would turn them into meaningless scales."""
    for name, tensor in tensors.items():
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        bad = tensor.isnan() if name.endswith(OBSERVER_STATS) else tensor.isnan() | (tensor.abs() > ABSURD)
        if bad.any():
            value = tensor[bad].flatten()[0].item()
            raise CheckpointMismatchError(f"{checkpoint}: tensor '{name}' holds {value:g} ({int(bad.sum())} of "
                                          f"{tensor.numel()} values NaN, infinite or beyond {ABSURD:g}): the "
                                          "checkpoint is damaged or its training diverged; use another checkpoint")


def float_model_config(cfg: Config):
    """The config's model without its options for mmseg QAT (``quant``, ``distill``): the float Segmenter."""
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.quant = None
    model_cfg.distill = None
    return model_cfg


def build_model(cfg: Config, fold_norms: bool = False):
    """The config's float model (:func:`float_model_config`) with its pretrained init; ``fold_norms`` folds
    LayerNorm affines into the next Linear (exact; see ``models.fold``)."""
    model = MODELS.build(float_model_config(cfg))
    with quiet_mmengine_info():
        model.init_weights()
    if fold_norms:
        fold_layernorms(model)
    return model.eval()


def dataset(cfg: Config, split: str):
    """The train or val split with the test pipeline (deterministic images for calibration and eval)."""
    loader = cfg.train_dataloader if split == "train" else cfg.val_dataloader
    ds_cfg = copy.deepcopy(loader.dataset)
    ds_cfg.pipeline = copy.deepcopy(cfg.get("test_pipeline", ds_cfg.pipeline))
    img_dir = Path(ds_cfg.data_root) / ds_cfg.data_prefix["img_path"]
    suffix = ds_cfg.get("img_suffix", ".jpg")
    if not any(img_dir.glob(f"*{suffix}")):
        raise ValueError(f"the {split} set is empty: no *{suffix} image in {img_dir}")
    return DATASETS.build(ds_cfg)


def state_size(state: dict) -> int:
    """The bytes of a state dict as torch.save writes it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.tell()


def run_ptq(config: str, checkpoint: str, num_samples: int, out: str, gelu: str | None = None,
            softmax: str | None = None, decoder: str | None = None, data_root: str | None = None,
            batch_size: int = 8, fold_norms: bool = True, calib_set=None, force: bool = False,
            weight_bits: int | str | None = None, select: str | None = None, size_ratio: float | None = None,
            weight_rounding: str | None = None, int8_weights: list[str] | None = None, strict: bool = False) -> dict:
    """Calibrate on ``num_samples`` images (ranges: the extremes of every image), make the per-layer choices
    asked for, convert, save; return a report.

    The float Segmenter is quantized op by op (:mod:`iseg_plugin.deploy.convert`). The images are the
    config's training set, or ``calib_set`` (test-pipeline outputs) if given; the deployed model is
    built for the size of the first of them. ``weight_bits`` (8, 4, "mixed"), ``select`` ("global",
    "unified"), ``size_ratio``, ``weight_rounding`` and ``int8_weights`` override the config's ``model.quant``
    (:func:`iseg_plugin.select.check_quant`); per-layer choices are scored on the first ``SCORE_IMAGES``
    calibration images, GPTQ takes the first ``ROUNDING_IMAGES``. ``out`` (and its
    calibration record) must not exist unless ``force``, nor be an input; both are checked first and
    written whole or not at all. ``strict``: refuse a degenerate calibration instead of warning
    (:func:`iseg_plugin.deploy.calibrate_prepared`).
    """
    if num_samples < 1:
        raise ValueError(f"--calib-samples must be at least 1, got {num_samples}")
    for path in (out, sidecar(out)):
        check_output(path, [config, checkpoint], force)
    cfg = load_config(config, data_root, gelu, softmax, decoder, check_data=calib_set is None,
                      weight_bits=weight_bits, select=select, size_ratio=size_ratio, weight_rounding=weight_rounding,
                      int8_weights=int8_weights)
    quant = quant_options(cfg)
    if calib_set is None:
        calib_set = dataset(cfg, "train")
    if num_samples > len(calib_set):
        raise ValueError(f"--calib-samples {num_samples} is more than the {len(calib_set)} calibration images")
    model = build_model(cfg)
    unknown = sorted(set(quant["int8_weights"]) - dict(model.named_modules()).keys())
    if unknown:
        raise ValueError(f"--int8-weights {unknown[0]}: the model has no such module (its top modules: "
                         f"{', '.join(name for name, _ in model.named_children())})")
    kept_init = load_fp32_checkpoint(model, checkpoint)
    fp32 = state_size(model.state_dict())
    if fold_norms:
        fold_layernorms(model)
    example = example_input(model, calib_set[0])
    prepared = prepare_segmenter(model, example, **prepare_options(quant))
    loader = DataLoader(calib_set, batch_size=min(batch_size, num_samples), shuffle=False, collate_fn=pseudo_collate)
    start = time.perf_counter()
    calibrate_prepared(prepared, model.data_preprocessor, loader, num_samples, strict=strict)
    calib_seconds = time.perf_counter() - start
    start = time.perf_counter()
    images = [(example_input(model, calib_set[i]),) for i in range(min(max(SCORE_IMAGES, ROUNDING_IMAGES), num_samples))]
    selection = choose(prepared, images[:SCORE_IMAGES], quant, rounding_inputs=images[:ROUNDING_IMAGES])
    select_seconds = time.perf_counter() - start
    deployed = convert(prepared, example, cfg.model.data_preprocessor.mean, cfg.model.data_preprocessor.std, selection)
    meta = dict(gelu=gelu, softmax=softmax, decoder=decoder, num_samples=num_samples, fold_norms=fold_norms, quant=quant)
    size = save_with_record(deployed, prepared.state_dict(), meta, out, force)
    return dict(out=str(out), deployed_bytes=size, fp32_bytes=fp32, calib_seconds=calib_seconds,
                kept_init=sorted({key.split(".")[0] for key in kept_init}), kept_init_count=len(kept_init),
                input_size=deployed.input_size, num_samples=num_samples, quant=quant, selection=selection,
                select_seconds=select_seconds)


def check_trained_as_configured(asked: dict, observers: dict, quant: dict, checkpoint: str | Path) -> None:
    """Refuse a QAT checkpoint whose operators or weight widths are not those of the config's ``quant``:
    loading it keeps its own (its observers hold them), which would deploy another model than the config
    says. ``asked``: each observer's (variant, weight bits) as the config built it, before loading."""
    found = {name: (observer.variant, observer.weight_bits) for name, observer in observers.items()}
    if quant["select"] == "global":
        for name, (variant, _) in asked.items():
            if found[name][0] != variant:
                raise CheckpointMismatchError(
                    f"{checkpoint} holds {found[name][0]} operators where the config's quant asks for {variant} "
                    f"({name}): deploy it with the config it was trained with (or quantize the float model with iseg ptq)")
    if quant["weight_bits"] == "mixed":
        return
    narrowed = [name for name, (_, bits) in asked.items() if bits == 8 and found[name][1] == 4]
    widened = [name for name, (_, bits) in asked.items() if bits == 4 and found[name][1] == 8]
    int4 = sum(bits == 4 for _, bits in asked.values())
    if narrowed or (widened and (not quant["int8_weights"] or len(widened) == int4)):
        got = 4 if narrowed else 8
        raise CheckpointMismatchError(
            f"{checkpoint} holds INT{got} weights where the config's quant asks for weight_bits={quant['weight_bits']}: "
            "deploy it with the config it was trained with")


def deploy_checkpoint(config: str, checkpoint: str, out: str, data_root: str | None = None,
                      force: bool = False) -> dict:
    """The deployed integer-only model of a QAT checkpoint (``mim train`` of an ``ISegmenter(quant=...)``
    config: its trained weights and frozen activation ranges), for the size of the first validation image;
    written with its calibration record, so that ``iseg eval --fake-quant`` compares the two forms.

    Refused: a checkpoint without activation ranges (an FP32 one: ``iseg ptq`` calibrates it) or of
    another model (keys named). ``out`` is checked before any work, and written whole or not at all."""
    for path in (out, sidecar(out)):
        check_output(path, [config, checkpoint], force)
    cfg = load_config(config, data_root)
    quant = quant_options(cfg)
    tensors = checkpoint_tensors(checkpoint)
    if not any(k.startswith("observers.") for k in tensors):
        raise CheckpointMismatchError(f"{checkpoint} holds no activation ranges (no 'observers.' keys): it is a "
                                      f"float checkpoint; quantize it with `iseg ptq {config} {checkpoint}`")
    with quiet_mmengine_info():
        model = MODELS.build(copy.deepcopy(cfg.model))
    asked = {name: (observer.variant, observer.weight_bits) for name, observer in model.observers.items()}
    result = model.load_state_dict(tensors, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointMismatchError(
            f"{checkpoint} is not a checkpoint of this config's model: missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]} ({len(result.missing_keys)} / {len(result.unexpected_keys)})")
    check_trained_as_configured(asked, model.observers, quant, checkpoint)
    example = example_input(model, dataset(cfg, "val")[0])
    deployed = model.deploy(tuple(example.shape[-2:]))
    meta = dict(quant=quant, fold_norms=False, decoder=None, num_samples=None, checkpoint=str(checkpoint))
    size = save_with_record(deployed, model.prepared.state_dict(), meta, out, force)
    float_state = {k: v for k, v in model.state_dict().items() if not k.startswith("observers.")}
    return dict(out=str(out), deployed_bytes=size, fp32_bytes=state_size(float_state),
                input_size=deployed.input_size, quant=quant)

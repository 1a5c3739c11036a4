"""Evaluation plots: which panels the overlays hold (no dataset image in figures meant for the repo)."""
import matplotlib.image
import numpy as np
import torch

from iseg_plugin.evaluate import save_plots

META = dict(classes=("a", "b"), palette=[[0, 0, 0], [255, 255, 255]])


def samples(labelled: bool):
    img = np.zeros((8, 10, 3), dtype=np.uint8)
    gt = np.ones((8, 10), dtype=np.int64) if labelled else None
    preds = {"fp32": np.zeros((8, 10), dtype=np.int64), "deployed": np.ones((8, 10), dtype=np.int64)}
    return [(img, gt, preds)] * 2


def overlay_columns(path) -> int:
    return matplotlib.image.imread(path).shape[1] // 300  # 3 inches per panel at 100 dpi


def test_overlays_hold_image_and_labels_only_when_asked(tmp_path):
    confusion = torch.tensor([[3, 1], [0, 4]])
    paths = save_plots(tmp_path / "all", confusion, samples(True), META)
    assert overlay_columns(paths[0]) == 4 and paths[1].endswith("confusion_matrix.png")
    assert overlay_columns(save_plots(tmp_path / "preds", confusion, samples(True), META, dataset_panels=False)[0]) == 2
    # unlabelled images (the demo's photos): no ground-truth panel, no confusion matrix
    paths = save_plots(tmp_path / "photos", torch.zeros(2, 2, dtype=torch.int64), samples(False), META)
    assert overlay_columns(paths[0]) == 3 and len(paths) == 1


def test_overlays_carry_a_class_legend_and_the_note(tmp_path):
    meta = dict(classes=("road", "sky"), palette=[[255, 0, 0], [0, 0, 255]])
    only_road = [(np.zeros((8, 10, 3), dtype=np.uint8), None, {"deployed": np.zeros((8, 10), dtype=np.int64)})]
    (path,) = save_plots(tmp_path, torch.zeros(2, 2, dtype=torch.int64), only_road, meta, note="photos, not streets")
    rgb = (matplotlib.image.imread(path)[..., :3] * 255).round()
    blue = (rgb[..., 2] > 200) & (rgb[..., 0] < 50) & (rgb[..., 1] < 50)
    assert blue.sum() > 20  # no pixel is predicted "sky": blue appears only in the legend

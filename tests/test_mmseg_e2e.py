"""End to end through stock MMSegmentation: `mim train` (QAT) and `mim test` with the ViT-T config."""
import math
import re
import shutil

import pytest
import torch

from helpers import make_ade20k, mim, run, tiny_ade_config

ITERS = 4


def losses(log: str) -> list[float]:
    return [float(v) for v in re.findall(r"Iter\(train\) \[\s*\d+/\d+\].*? loss: ([0-9.naif]+)", log)]


def miou(log: str, stage: str) -> float:
    found = re.findall(rf"Iter\({stage}\) \[\d+/\d+\]\s+aAcc: [0-9.]+\s+mIoU: ([0-9.]+)", log)
    assert found, f"no {stage} mIoU in the log"
    return float(found[-1])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("ade")
    data = make_ade20k(root / "data")
    return root, data


@pytest.fixture(scope="module")
def trained(workspace):
    root, data = workspace
    cfg = tiny_ade_config(root / "cfg.py", data, root / "work", iters=ITERS)
    result = run([mim(), "train", "mmseg", str(cfg), "--gpus", "0"], cwd=root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root, cfg, result.stdout + result.stderr


def test_mim_train_runs_qat_with_calibration(trained):
    root, _, log = trained
    assert "calibrated the quantized model on 2 images" in log
    assert "activation ranges frozen after 2 iterations" in log
    values = losses(log)
    assert len(values) == ITERS and all(math.isfinite(v) for v in values)
    assert values[-1] < values[0]
    assert 0.0 <= miou(log, "val") <= 100.0
    checkpoint = torch.load(root / "work" / f"iter_{ITERS}.pth", weights_only=True)  # data only, safe load
    assert any(k.startswith("observers.") and k.endswith(".min_val") for k in checkpoint["state_dict"])


def test_mim_test_reproduces_the_validation_score(trained):
    root, cfg, train_log = trained
    result = run([mim(), "test", "mmseg", str(cfg), "--checkpoint", str(root / "work" / f"iter_{ITERS}.pth"),
                  "--gpus", "0"], cwd=root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert miou(result.stdout + result.stderr, "test") == miou(train_log, "val")


def test_mim_train_two_processes(workspace):
    root, data = workspace
    cfg = tiny_ade_config(root / "cfg_dist.py", data, root / "work_dist", iters=2)
    result = run([mim(), "train", "mmseg", str(cfg), "--gpus", "2", "--launcher", "pytorch"], cwd=root)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "Distributed training: True" in log
    assert len(losses(log)) == 2


def test_missing_data_root_names_the_path(workspace):
    root, data = workspace
    missing = root / "nowhere" / "ADEChallengeData2016"
    cfg = tiny_ade_config(root / "cfg_missing.py", missing, root / "work_missing", iters=1)
    result = run([mim(), "train", "mmseg", str(cfg), "--gpus", "0"], cwd=root)
    assert result.returncode != 0
    assert "FileNotFoundError" in result.stderr and str(missing) in result.stderr
    shutil.rmtree(root / "work_missing", ignore_errors=True)

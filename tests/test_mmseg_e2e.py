"""End to end through stock MMSegmentation: `mim train` (QAT) and `mim test` with the ViT-T config."""
import json
import math
import re
import shutil

import pytest
import torch

from helpers import iseg, make_ade20k, mim, run, tiny_ade_config

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


def test_resumed_training_keeps_the_checkpoint_ranges(trained, tmp_path):
    """`--resume` goes on from the last checkpoint without calibrating again (the checkpoint holds the ranges
    and the trained weights)."""
    root, cfg, _ = trained
    work = tmp_path / "work"
    shutil.copytree(root / "work", work)
    result = run([mim(), "train", "mmseg", str(cfg), "--gpus", "0", "--resume", "--work-dir", str(work),
                  "--cfg-options", f"train_cfg.max_iters={ITERS + 1}"], cwd=root)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert f"resumed epoch: 0, iter: {ITERS}" in log and "calibrated the quantized model" not in log
    assert len(losses(log)) == 1


def test_mim_test_reproduces_the_validation_score(trained):
    root, cfg, train_log = trained
    result = run([mim(), "test", "mmseg", str(cfg), "--checkpoint", str(root / "work" / f"iter_{ITERS}.pth"),
                  "--gpus", "0"], cwd=root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert miou(result.stdout + result.stderr, "test") == miou(train_log, "val")


def test_iseg_deploy_writes_the_integer_model_of_the_qat_checkpoint(trained, tmp_path):
    """`iseg deploy` of a `mim train` checkpoint: its deployed model agrees with its fake-quant form on every
    pixel; an FP32 checkpoint is refused (it needs `iseg ptq`), an existing output is kept."""
    root, cfg, _ = trained
    checkpoint = root / "work" / f"iter_{ITERS}.pth"
    out = tmp_path / "qat.iseg"
    result = run([iseg(), "deploy", str(cfg), str(checkpoint), "--out", str(out)], cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "deployed integer model" in result.stdout and out.is_file()
    report = tmp_path / "eval.json"
    result = run([iseg(), "eval", str(cfg), str(out), "--fake-quant", "--json", str(report)], cwd=root)
    assert result.returncode == 1 and "put LoadAnnotations before Resize" in result.stderr  # labels at another size
    native = tmp_path / "cfg_native.py"  # the same model, tested at the images' own size
    native.write_text(f"_base_ = [r'{cfg}']\ntest_pipeline = [dict(type='LoadImageFromFile'), "
                      "dict(type='LoadAnnotations', reduce_zero_label=True), dict(type='PackSegInputs')]\n")
    out = tmp_path / "qat_native.iseg"
    assert run([iseg(), "deploy", str(native), str(checkpoint), "--out", str(out)], cwd=root).returncode == 0
    result = run([iseg(), "eval", str(native), str(out), "--fake-quant", "--json", str(report),
                  "--out-dir", str(tmp_path / "eval")], cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads(report.read_text())
    assert evaluated["pixel_agreement"]["deployed vs fake-quant"] == 100.0
    assert evaluated["forms"]["deployed"]["mIoU"] == evaluated["forms"]["fake-quant"]["mIoU"]

    before = out.read_bytes()
    result = run([iseg(), "deploy", str(cfg), str(checkpoint), "--out", str(out)], cwd=root)
    assert result.returncode == 1 and "exists: pass --force" in result.stderr and out.read_bytes() == before
    float_checkpoint = tmp_path / "fp32.pth"
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    torch.save({"state_dict": {k: v for k, v in state.items() if not k.startswith("observers.")}}, float_checkpoint)
    result = run([iseg(), "deploy", str(cfg), str(float_checkpoint), "--out", str(tmp_path / "f.iseg")], cwd=root)
    assert result.returncode == 1 and "iseg ptq" in result.stderr and "Traceback" not in result.stderr


# 0: each process calibrated on its own shard, then rank 0's ranges; at W4A8 GPTQ also set each process's trained
# weights from its own shard, then rank 0's (the freeze checks parameters and ranges both)
@pytest.mark.parametrize("freeze_iter,weight_bits", [(2, 8), (0, 4)])
def test_mim_train_two_processes(workspace, freeze_iter, weight_bits):
    root, data = workspace
    cfg = tiny_ade_config(root / f"cfg_dist{freeze_iter}.py", data, root / f"work_dist{freeze_iter}", iters=3,
                          extra=f"custom_hooks[1]['freeze_iter'] = {freeze_iter}\n"
                                f"model['quant'] = dict(weight_bits={weight_bits})")
    result = run([mim(), "train", "mmseg", str(cfg), "--gpus", "2", "--launcher", "pytorch"], cwd=root)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "Distributed training: True" in log
    assert len(losses(log)) == 3
    assert f"activation ranges frozen after {freeze_iter} iterations (identical on 2 processes)" in log


def test_missing_data_root_names_the_path(workspace):
    root, data = workspace
    missing = root / "nowhere" / "ADEChallengeData2016"
    cfg = tiny_ade_config(root / "cfg_missing.py", missing, root / "work_missing", iters=1)
    result = run([mim(), "train", "mmseg", str(cfg), "--gpus", "0"], cwd=root)
    assert result.returncode != 0
    assert "FileNotFoundError" in result.stderr and str(missing) in result.stderr
    shutil.rmtree(root / "work_missing", ignore_errors=True)

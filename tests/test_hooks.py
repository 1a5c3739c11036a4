"""The CalibrationHook's loader: which images and pipeline the one-shot calibration before QAT reads."""
from types import SimpleNamespace

import pytest
from mmengine.config import Config

from iseg_plugin.mmseg import CalibrationHook

TRAIN = [dict(type="LoadImageFromFile"), dict(type="RandomCrop", crop_size=(8, 8)),
         dict(type="PhotoMetricDistortion"), dict(type="PackSegInputs")]
TEST = [dict(type="LoadImageFromFile"), dict(type="PackSegInputs")]


def runner(test_pipeline=TEST):
    cfg = dict(train_dataloader=dict(batch_size=4, num_workers=2, persistent_workers=True,
                                     sampler=dict(type="InfiniteSampler", shuffle=True),
                                     dataset=dict(type="BaseSegDataset", data_root="d", pipeline=TRAIN)))
    if test_pipeline is not None:
        cfg["test_pipeline"] = test_pipeline
    return SimpleNamespace(cfg=Config(cfg))


def test_calibration_reads_the_train_images_through_the_test_pipeline():
    run = runner()
    loader = CalibrationHook(num_samples=3, batch_size=8)._loader_cfg(run)
    assert loader["dataset"]["pipeline"] == TEST and loader["dataset"]["data_root"] == "d"
    assert loader["sampler"] == dict(type="DefaultSampler", shuffle=False)  # the same images at every run
    assert loader["batch_size"] == 3 and loader["persistent_workers"] is False
    assert run.cfg.train_dataloader.dataset.pipeline == TRAIN  # the training loader is left as it was
    assert run.cfg.train_dataloader.sampler.type == "InfiniteSampler"


def test_calibration_can_keep_the_training_pipeline():
    loader = CalibrationHook(num_samples=1, pipeline="train")._loader_cfg(runner())
    assert loader["dataset"]["pipeline"] == TRAIN


def test_calibration_options_are_checked():
    with pytest.raises(ValueError, match="pipeline must be 'test'"):
        CalibrationHook(pipeline="val")
    with pytest.raises(ValueError, match="needs the config's test_pipeline"):
        CalibrationHook()._loader_cfg(runner(test_pipeline=None))

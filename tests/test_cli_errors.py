"""Bad and careless use of the `iseg` command: short errors without a traceback, and no file lost."""
import re
import warnings
from pathlib import Path

import pytest
import torch

from iseg_plugin.cli import main
from iseg_plugin.deploy.io import save_deployed
from iseg_plugin.files import OutputError, atomic_write, check_output
from iseg_plugin.ptq import run_ptq

from test_deploy import deployed_pair

CONFIG = Path(__file__).resolve().parent.parent / "mmseg_configs" / "isegmenter_vit-s_camvid.py"


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "m.iseg"
    save_deployed(deployed_pair()[1], path)
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err


def test_an_existing_output_is_kept_unless_forced(model_file, tmp_path, capsys, gemm_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"precious")
    code, err = run(capsys, "export", model_file, "--out", out)
    assert code == 1 and "exists: pass --force" in err and "Traceback" not in err
    assert out.read_bytes() == b"precious"
    assert run(capsys, "export", model_file, "--out", out, "--force")[0] == 0
    assert out.stat().st_size > 1000 and not list(tmp_path.glob(".*.tmp"))


def test_an_output_that_is_an_input_is_refused(model_file, capsys):
    before = model_file.read_bytes()
    code, err = run(capsys, "export", model_file, "--out", model_file, "--force")
    assert code == 1 and "is also an input" in err
    assert model_file.read_bytes() == before


def test_an_unwritable_output_is_refused_before_any_work(model_file, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, err = run(capsys, "export", model_file, "--out", blocker / "m.onnx")
    assert code == 1 and "is a file, not a folder" in err
    with pytest.raises(OutputError, match="is a folder"):
        check_output(tmp_path)


def test_ptq_refuses_to_overwrite_its_checkpoint_before_building_anything(tmp_path):
    checkpoint = tmp_path / "fp32.pth"
    torch.save({"state_dict": {}}, checkpoint)
    before = checkpoint.read_bytes()
    with pytest.raises(OutputError, match="also an input"):
        run_ptq(str(CONFIG), str(checkpoint), 1, str(checkpoint))
    assert checkpoint.read_bytes() == before


def test_ptq_refuses_an_unknown_int8_weights_module_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"--int8-weights decoder: the model has no such module \(.*decode_head"):
        run_ptq(str(CONFIG), str(tmp_path / "unread.pth"), 1, str(tmp_path / "m.iseg"), calib_set=[None],
                weight_bits=4, int8_weights=["decoder"])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv,message", [
    (["ptq", CONFIG, "ckpt.pth", "--out", "x.iseg", "--calib-samples", "0"], "must be at least 1, got 0"),
    (["ptq", CONFIG, "ckpt.pth", "--out", "x.iseg", "--calib-samples", "-1"], "must be at least 1, got -1"),
    (["ptq", CONFIG, "ckpt.pth", "--out", "x.iseg", "--weight-bits", "3"], "must be 4, 8 or mixed, got '3'"),
    (["ptq", CONFIG, "ckpt.pth", "--out", "x.iseg", "--size-ratio", "0"], "must be positive, got 0"),
    (["ptq", CONFIG, "ckpt.pth", "--out", "x.iseg", "--select", "best"], "invalid choice: 'best'"),
    (["eval", CONFIG, "m.iseg", "--limit", "0"], "must be at least 1, got 0"),
    (["eval", CONFIG, "m.iseg", "--limit", "two"], "'two' is not a whole number"),
])
def test_bad_numbers_are_refused_when_parsed(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_damaged_model_is_one_line_and_debug_shows_the_traceback(model_file, tmp_path, capsys):
    damaged = tmp_path / "damaged.iseg"
    blob = torch.load(model_file, weights_only=True)
    name = next(k for k, v in blob["state_dict"].items() if v.numel() > 100)
    blob["state_dict"][name].view(-1)[0] += 1
    torch.save(blob, damaged)
    code, err = run(capsys, "export", damaged, "--out", tmp_path / "d.onnx")
    assert code == 1 and "is damaged" in err and "Traceback" not in err and len(err.splitlines()) <= 3
    assert not (tmp_path / "d.onnx").exists()
    with pytest.raises(ValueError, match="is damaged"):
        main(["--debug", "export", str(damaged), "--out", str(tmp_path / "d.onnx")])


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")

    def half_write(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_write)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_a_checkpoint_that_does_not_fit_is_refused_by_name(model_file, tmp_path):
    from iseg_plugin.models import CheckpointMismatchError
    from iseg_plugin.ptq import load_fp32_checkpoint

    from test_quant_model import build

    model = build(None)
    with pytest.raises(CheckpointMismatchError, match="is a deployed integer model.*not a checkpoint"):
        load_fp32_checkpoint(model, model_file)
    empty = tmp_path / "empty.pth"
    torch.save({"state_dict": {}}, empty)
    with pytest.raises(CheckpointMismatchError, match="holds no tensors"):
        load_fp32_checkpoint(model, empty)
    foreign = tmp_path / "foreign.pth"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(3)}}, foreign)
    with pytest.raises(CheckpointMismatchError, match=r"none of the 1 tensors.*\['encoder.weight'\]"):
        load_fp32_checkpoint(model, foreign)
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointMismatchError, match="not a readable checkpoint"):
        load_fp32_checkpoint(model, text)
    decoder_only = tmp_path / "decoder.pth"
    torch.save({"state_dict": {f"module.decode_head.{k}": v for k, v in model.decode_head.state_dict().items()}},
               decoder_only)
    kept = load_fp32_checkpoint(model, decoder_only)
    assert kept and all(k.startswith("backbone.") for k in kept)


class Payload:
    """A pickled object whose loading would run code."""

    def __reduce__(self):
        return (print, ("this would run",))


def test_a_pickle_with_code_is_refused_without_offering_to_load_it(tmp_path):
    from iseg_plugin.deploy.io import DeployedFileError, load_deployed

    path = tmp_path / "evil.iseg"
    torch.save({"format": "iseg-deployed-v2", "payload": Payload()}, path)
    with pytest.raises(DeployedFileError) as raised:
        load_deployed(path)
    message = str(raised.value)
    assert "could run code (refused)" in message and "weights_only" not in message and "can still" not in message


# issue 37, case 9: each message says what was wrong and how to fix it

def test_a_text_file_or_an_empty_file_as_the_model_is_named_as_such(tmp_path, capsys):
    text = tmp_path / "notes.iseg"
    text.write_text("export the model tomorrow")  # 'e' (101) is a pickle opcode torch reads as a key
    code, err = run(capsys, "export", text)
    assert code == 1 and "notes.iseg is not a deployed model: not a file torch.save wrote (a text or other " \
                          "file?), or damaged" in err and "KeyError" not in err
    empty = tmp_path / "empty.iseg"
    empty.write_bytes(b"")
    code, err = run(capsys, "export", empty)
    assert code == 1 and "empty.iseg is empty (0 bytes), not a deployed model: an interrupted copy? Copy or write " \
                          "it again" in err and "EOFError" not in err


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e30])
def test_a_checkpoint_with_nan_inf_or_absurd_values_is_refused_naming_the_tensor(tmp_path, value):
    from iseg_plugin.models import CheckpointMismatchError
    from iseg_plugin.ptq import checkpoint_tensors

    weight = torch.randn(4, 4)
    weight[1, 2] = value
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {"decode_head.fc.weight": weight, "decode_head.fc.bias": torch.zeros(4),
                               "observers.a.min_val": torch.tensor(float("inf")),  # (an unobserved range)
                               "observers.a.channel_energy": torch.tensor([4e6])}}, path)  # (a square: 2000 ** 2)
    message = (f"ckpt.pth: tensor 'decode_head.fc.weight' holds {value:g} (1 of 16 values NaN, infinite or beyond "
               "1e+06): the checkpoint is damaged or its training diverged; use another checkpoint")
    with pytest.raises(CheckpointMismatchError, match=re.escape(message)):
        checkpoint_tensors(path)
    torch.save({"state_dict": {"observers.a.max_val": torch.tensor(float("nan"))}}, path)
    with pytest.raises(CheckpointMismatchError, match="tensor 'observers.a.max_val' holds nan"):
        checkpoint_tensors(path)


def test_a_config_with_a_syntax_error_is_named(tmp_path, capsys):
    config = tmp_path / "broken.py"
    config.write_text("model = dict(\n    type='ISegmenter',\n    quant=dict(gelu='poly'\n")
    code, err = run(capsys, "ptq", config, "ckpt.pth", "--out", tmp_path / "m.iseg")
    assert code == 1 and "error: config " in err and "broken.py, line" in err and "Python syntax error" in err


def _label_item(label, image_size=(8, 8), ori_shape=None):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    sample = SegDataSample(metainfo=dict(img_path="img/a.png", seg_map_path="ann/a.png",
                                         ori_shape=ori_shape or image_size))
    sample.gt_sem_seg = PixelData(data=label)
    return dict(inputs=torch.zeros(3, *image_size, dtype=torch.uint8), data_samples=sample)


def test_bad_labels_are_named_with_what_to_fix():
    import numpy as np
    from mmseg.datasets.transforms import PackSegInputs

    from iseg_plugin.evaluate import check_label

    good = torch.zeros(1, 8, 8, dtype=torch.uint8)
    good[0, 0, 0] = 255
    assert check_label(_label_item(good), 11, 255).shape == (8, 8)
    out_of_range = good.clone()
    out_of_range[0, 1, 1] = 40
    with pytest.raises(ValueError, match=r"ann/a.png holds class id 40, but the dataset has 11 classes \(ids 0..10, "
                                         r"255 ignored\): check the labels or the dataset's classes"):
        check_label(_label_item(out_of_range), 11, 255)
    with pytest.warns(UserWarning, match="usually the segmentation map is 2D"):  # (mmseg's own word, not a refusal)
        colour = PackSegInputs()(dict(img=np.zeros((8, 8, 3), np.uint8), gt_seg_map=np.zeros((8, 8, 3), np.uint8),
                                      img_path="img/a.png", seg_map_path="ann/a.png", img_shape=(8, 8), ori_shape=(8, 8)))
    with pytest.raises(ValueError, match=r"ann/a.png is not a single-channel label \(read as \(8, 8, 3\)\): labels must "
                                         "be single-channel PNGs of class ids"):
        check_label(colour, 11, 255)
    with pytest.raises(ValueError, match=r"ann/a.png is 6x8 but its image img/a.png is 8x8: each label must have "
                                         "its image's size"):
        check_label(_label_item(torch.zeros(1, 6, 8, dtype=torch.uint8)), 11, 255)
    with pytest.raises(ValueError, match=r"test_pipeline resizes the images to 4x4 but not their labels \(8x8\): put "
                                         "LoadAnnotations before Resize"):
        check_label(_label_item(good, image_size=(4, 4), ori_shape=(8, 8)), 11, 255)


# issue 37, case 5: a degenerate calibration is named (or refused with --strict)

def test_a_constant_calibration_image_is_warned_about_or_refused_when_strict():
    from iseg_plugin.deploy import calibrate_prepared, prepare_segmenter
    from iseg_plugin.deploy.convert import CalibrationWarning

    from test_deploy import batch, pixels
    from test_quant_model import build, trained_like

    model = trained_like(build(None)).eval()
    constant = torch.full((1, 3, 64, 64), 128, dtype=torch.uint8)
    example = model.data_preprocessor(batch(constant), False)["inputs"]
    prepared = prepare_segmenter(model, example)
    with pytest.warns(CalibrationWarning, match=r"calibration image 2 of 2 is \(near\) constant: the ranges observed "
                                                "on it do not fit real images; calibrate on real, varied images"):
        calibrate_prepared(prepared, model.data_preprocessor, [batch(torch.cat([pixels(1, 1), constant]))], 2,
                           show_progress=False)
    with pytest.raises(ValueError, match=r"calibration image 1 of 1 is \(near\) constant.*\(refused: --strict\)"):
        calibrate_prepared(prepare_segmenter(model, example), model.data_preprocessor, [batch(constant)], 1,
                           show_progress=False, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)  # real images: no warning
        calibrate_prepared(prepare_segmenter(model, example), model.data_preprocessor, [batch(pixels(2, 1))], 2,
                           show_progress=False)


def test_collapsed_ranges_are_named_by_their_op():
    from iseg_plugin.deploy import calibrate_prepared, prepare_segmenter
    from iseg_plugin.deploy.convert import CalibrationWarning, collapsed_ranges

    from test_deploy import batch, pixels
    from test_quant_model import build, trained_like

    model = trained_like(build(None)).eval()
    example = model.data_preprocessor(batch(pixels(1, 1)), False)["inputs"]
    prepared = prepare_segmenter(model, example)
    calibrate_prepared(prepared, model.data_preprocessor, [batch(pixels(1, 1))], 1, show_progress=False)
    assert collapsed_ranges(prepared) == []
    node = next(n for n in prepared.graph.nodes if n.op == "call_module" and "activation_post_process" in n.target)
    observer = prepared.get_submodule(node.target)  # the (padded) image's range, as if every pixel were one value
    observer.max_val.copy_(observer.min_val)
    assert collapsed_ranges(prepared) == ["pad"]


# issue 37, case 10

def test_deploy_refuses_a_checkpoint_trained_with_other_quant_options():
    from iseg_plugin.models import CheckpointMismatchError
    from iseg_plugin.ops.observer import IsegObserver
    from iseg_plugin.ptq import check_trained_as_configured
    from iseg_plugin.select import check_quant

    def observers(gelu, bits):
        return {"gelu": IsegObserver(variant=gelu), "fc": IsegObserver(weight_bits=bits)}

    asked = {name: (o.variant, o.weight_bits) for name, o in observers("shift", 8).items()}
    check_trained_as_configured(asked, observers("shift", 8), check_quant(dict(gelu="shift")), "ok.pth")
    with pytest.raises(CheckpointMismatchError, match="qat.pth holds poly operators where the config's quant asks for "
                                                      r"shift \(gelu\): deploy it with the config it was trained with"):
        check_trained_as_configured(asked, observers("poly", 8), check_quant(dict(gelu="shift")), "qat.pth")
    asked_w4 = {name: (o.variant, o.weight_bits) for name, o in observers("poly", 4).items()}
    with pytest.raises(CheckpointMismatchError, match="qat.pth holds INT8 weights where the config's quant asks for "
                                                      "weight_bits=4: deploy it with the config it was trained with"):
        check_trained_as_configured(asked_w4, observers("poly", 8), check_quant(dict(weight_bits=4)), "qat.pth")
    with pytest.raises(CheckpointMismatchError, match="holds INT4 weights where the config's quant asks for "
                                                      "weight_bits=8"):
        check_trained_as_configured(asked, observers("shift", 4), check_quant(dict(gelu="shift")), "qat.pth")


def test_demo_refuses_a_data_root_without_camvid_before_any_work(tmp_path, capsys):
    code, err = run(capsys, "demo", "--data-root", tmp_path / "camvdi", "--out-dir", tmp_path / "demo")
    assert code == 1 and "--data-root" in err and "camvdi has no train/ and val/ folders: give the CamVid folder, " \
                                                  "or leave --data-root out to use the sample photos" in err
    assert not (tmp_path / "demo").exists()

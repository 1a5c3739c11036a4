"""Bad and careless use of the `iseg` command: short errors without a traceback, and no file lost."""
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

"""Issue 37: no silent wrong model, no lost file, the model and its calibration record as one."""
import copy
import errno
import os
import random
import zipfile
from pathlib import Path

import pytest
import torch

from iseg_plugin.cli import main
from iseg_plugin.deploy.io import DeployedFileError, load_deployed, save_deployed
from iseg_plugin.files import OutputError, sidecar, write_together
from iseg_plugin.ptq import load_record, save_with_record

from test_deploy import deployed_pair, pixels

CONFIG = Path(__file__).resolve().parent.parent / "mmseg_configs" / "isegmenter_vit-s_camvid.py"


@pytest.fixture(scope="module")
def pair():
    return deployed_pair()


@pytest.fixture(scope="module")
def saved(pair, tmp_path_factory):
    """A deployed model with its calibration record, and its outputs on a fixed image."""
    model, deployed = pair
    path = tmp_path_factory.mktemp("pair") / "m.iseg"
    save_with_record(deployed, model.state_dict(), {"quant": {"gelu": "poly"}}, path, force=False)
    x = pixels(1, 7).flip(1).contiguous()
    with torch.no_grad():
        logits = deployed(x)[0]
    return path, x, logits


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


# 1. a damaged file: refused whole, wherever the damage is

def _metadata_span(path: Path) -> tuple[int, int]:
    """The bytes of the pickled record (everything but the tensors) inside the zip file."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("data.pkl"))
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    return start, start + info.compress_size


def test_any_single_byte_changed_is_refused_or_changes_nothing(saved, tmp_path):
    """Property: one byte changed anywhere (250 places spread over the pickled record, where one changed
    value used to load silently, and 100 anywhere in the file, ~40 ms each) is refused with
    DeployedFileError, or the model loads and gives the same integers."""
    path, x, logits = saved
    data = path.read_bytes()
    start, end = _metadata_span(path)
    rng = random.Random(37)
    positions = list(range(start, end, max(1, (end - start) // 250))) + rng.sample(range(len(data)), 100)
    damaged, loaded = tmp_path / "d.iseg", 0
    for pos in positions:
        changed = bytearray(data)
        changed[pos] ^= rng.randrange(1, 256)
        damaged.write_bytes(changed)
        try:
            model = load_deployed(damaged)
        except DeployedFileError:
            continue
        loaded += 1
        with torch.no_grad():
            assert torch.equal(model(x)[0], logits), f"byte {pos} changed the model's output silently"
    assert loaded < len(positions) // 2  # (most changes are refused)


@pytest.mark.parametrize("change", ["residual add bits", "layernorm eps", "logit_scale", "input_size"])
def test_changed_metadata_is_refused(saved, tmp_path, change):
    path = saved[0]
    blob = torch.load(path, weights_only=True)
    record = blob["model"]
    if change == "logit_scale":
        record["logit_scale"] *= 2
    elif change == "input_size":
        record["input_size"] = [352, 480]
    else:
        kind, attr = {"residual add bits": ("Add", "bits"), "layernorm eps": ("LayerNorm", None)}[change]
        spec = next(s for s in record["graph"]["modules"].values() if s["type"] == kind)
        attr = attr or next(k for k in spec["attrs"] if isinstance(spec["attrs"][k], int))
        spec["attrs"][attr] = spec["attrs"][attr] // 2 if isinstance(spec["attrs"][attr], int) else 0
    damaged = tmp_path / "d.iseg"
    torch.save(blob, damaged)
    with pytest.raises(DeployedFileError, match="is damaged: its content does not match the checksum"):
        load_deployed(damaged)


# 2. / 8. --json and --out-dir: the rules of --out, checked before the work

def test_eval_json_and_out_dir_are_checked_before_the_work(saved, tmp_path, capsys):
    path = saved[0]
    before = path.read_bytes()
    code, err = run(capsys, "eval", CONFIG, path, "--json", path, "--out-dir", tmp_path / "plots")
    assert code == 1 and f"--json {path} is also an input of this command" in err and path.read_bytes() == before
    code, err = run(capsys, "eval", CONFIG, path, "--json", sidecar(path), "--force", "--out-dir", tmp_path / "plots")
    assert code == 1 and "is the calibration record of an input" in err
    old = tmp_path / "report.json"
    old.write_text("earlier report")
    code, err = run(capsys, "eval", CONFIG, path, "--json", old, "--out-dir", tmp_path / "plots")
    assert code == 1 and "report.json exists: pass --force to overwrite it, or choose another --json" in err
    assert old.read_text() == "earlier report"
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, err = run(capsys, "eval", CONFIG, path, "--out-dir", blocker)
    assert code == 1 and "a_file is a file, not a folder" in err and "Traceback" not in err
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "overlays.png").write_bytes(b"earlier plot")
    code, err = run(capsys, "eval", CONFIG, path, "--out-dir", tmp_path / "plots")
    assert code == 1 and "overlays.png exists: pass --force to overwrite it, or choose another --out-dir" in err


def test_demo_json_is_checked_before_the_work(tmp_path, capsys):
    old = tmp_path / "report.json"
    old.write_text("earlier report")
    code, err = run(capsys, "demo", "--out-dir", tmp_path / "demo", "--json", old)
    assert code == 1 and "exists: pass --force" in err and old.read_text() == "earlier report"
    code, err = run(capsys, "demo", "--out-dir", tmp_path / "demo", "--json", tmp_path / "demo" / "camvid_int.iseg")
    assert code == 1 and "is a file the demo writes itself" in err
    assert not (tmp_path / "demo").exists()


# 3. the model and its calibration record as one

def test_the_calibration_record_is_checked_and_bound_to_its_model(pair, saved, tmp_path):
    path = saved[0]
    digest = load_deployed(path).sha256
    assert load_record(path, digest)["meta"] == {"quant": {"gelu": "poly"}}
    model, deployed = pair
    changed = copy.deepcopy(deployed)
    changed.logit_scale *= 2
    other = tmp_path / "other.iseg"  # another model, with its own record
    save_with_record(changed, model.state_dict(), {"quant": {"gelu": "poly"}}, other, force=False)
    with pytest.raises(ValueError, match=r"other.iseg.calib.pth belongs to another model than .*other.iseg .*--force"):
        load_record(other, digest)
    record = torch.load(sidecar(path), weights_only=True)
    next(v for v in record["state_dict"].values() if v.is_floating_point()).view(-1)[0] += 1e-3
    torch.save(record, sidecar(other))
    with pytest.raises(ValueError, match="calib.pth is damaged: its content does not match the checksum"):
        load_record(other, digest)
    del record["model_sha256"]
    torch.save(record, sidecar(other))
    with pytest.raises(ValueError, match="is not bound to its model .*write the model and it again with `iseg ptq`"):
        load_record(other, digest)


def test_a_forced_write_that_fails_leaves_the_old_pair(pair, tmp_path):
    model, deployed = pair
    path = tmp_path / "m.iseg"
    save_with_record(deployed, model.state_dict(), {}, path, force=False)
    before = {p: p.read_bytes() for p in (path, sidecar(path))}

    for error in (OSError(28, "No space left on device"), RuntimeError("[enforce fail at inline_container.cc:672] . "
                                                                      "unexpected pos 4096 vs 0")):
        def disk_full(tmp):
            tmp.write_bytes(b"half")
            raise error

        with pytest.raises(OutputError, match=r"cannot write .*m.iseg: the disk is full \(\d+ MB free\); no file was "
                                              "changed: free some space or choose another output path"):
            write_together([(sidecar(path), lambda tmp: tmp.write_bytes(b"new record")), (path, disk_full)])
        assert {p: p.read_bytes() for p in before} == before
        assert sorted(os.listdir(tmp_path)) == ["m.iseg", "m.iseg.calib.pth"]


def test_export_refuses_the_calibration_record_as_output(saved, capsys):
    path = saved[0]
    before = sidecar(path).read_bytes()
    code, err = run(capsys, "export", path, "--out", sidecar(path), "--force")
    assert code == 1 and "is the calibration record of an input of this command" in err
    assert sidecar(path).read_bytes() == before


# 4. two runs, one --out: the second cannot replace the first's file

def test_two_runs_cannot_both_claim_one_output(pair, tmp_path):
    model, deployed = pair
    path = tmp_path / "m.iseg"

    def other_run_finishes_first(tmp):  # both passed the early check; the other run writes first
        path.write_bytes(b"the other run's model")
        tmp.write_bytes(b"this run's record")

    with pytest.raises(OutputError, match="m.iseg appeared while this run was working .*it is kept"):
        write_together([(sidecar(path), other_run_finishes_first), (path, lambda tmp: tmp.write_bytes(b"mine"))],
                       replace=False)
    assert path.read_bytes() == b"the other run's model" and sorted(os.listdir(tmp_path)) == ["m.iseg"]
    with pytest.raises(OutputError, match="appeared while this run was working"):
        save_with_record(deployed, model.state_dict(), {}, path, force=False)
    assert path.read_bytes() == b"the other run's model"


def test_the_claim_works_on_a_filesystem_without_hard_links(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    (path,) = write_together([(tmp_path / "out.bin", lambda tmp: tmp.write_bytes(b"first"))], replace=False)
    assert path.read_bytes() == b"first"
    with pytest.raises(OutputError, match="appeared while this run was working"):
        write_together([(path, lambda tmp: tmp.write_bytes(b"second"))], replace=False)
    assert path.read_bytes() == b"first" and sorted(os.listdir(tmp_path)) == ["out.bin"]


def test_outputs_keep_the_umask_permissions(tmp_path):
    mask = os.umask(0o027)
    try:
        (path,) = write_together([(tmp_path / "out.bin", lambda tmp: tmp.write_bytes(b"x"))])
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o640


def test_temporaries_of_a_killed_run_are_removed_by_the_next_write(tmp_path):
    from iseg_plugin.files import _writer

    host = _writer().rsplit("-", 1)[0]
    dead = tmp_path / f".out.bin.{host}-4194305.abc123.tmp"  # beyond Linux's largest process id: no such writer
    alive = tmp_path / f".out.bin.{_writer()}.def456.tmp"  # this process: maybe writing it now
    other_host = tmp_path / ".out.bin.elsewhere-4194305.ghi789.tmp"  # another host's: cannot tell
    for path in (dead, alive, other_host):
        path.write_bytes(b"half")
    write_together([(tmp_path / "out.bin", lambda tmp: tmp.write_bytes(b"whole"))])
    assert not dead.exists() and alive.exists() and other_host.exists()
    assert (tmp_path / "out.bin").read_bytes() == b"whole"


def test_a_file_of_the_earlier_format_is_read_with_a_warning(saved, tmp_path):
    """v3 files (checksum of the tensors only) stay readable, saying that their metadata is not checked."""
    from iseg_plugin.deploy.io import _tensor_checksum

    path, x, logits = saved
    blob = torch.load(path, weights_only=True)
    blob["format"], blob["sha256"] = "iseg-deployed-v3", _tensor_checksum(blob["state_dict"])
    old = tmp_path / "v3.iseg"
    torch.save(blob, old)
    with pytest.warns(UserWarning, match="v3.iseg is a iseg-deployed-v3 file, whose checksum covers its tensors only: "
                                         "write it again with `iseg ptq`"):
        model = load_deployed(old)
    with torch.no_grad():
        assert torch.equal(model(x)[0], logits)
    blob["sha256"] = blob["sha256"][::-1]
    torch.save(blob, old)
    with pytest.raises(DeployedFileError, match="is damaged"):
        load_deployed(old)

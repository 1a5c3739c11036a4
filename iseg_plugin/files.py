"""Output files: checked before the work that produces them, written whole or not at all."""
from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import pickle
import platform
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

import torch


class OutputError(ValueError):
    """An output path that must not or cannot be written."""


def sidecar(model_path: str | Path) -> Path:
    """The calibration record written next to a deployed model (float weights and observed ranges, from
    which `iseg eval` rebuilds the FP32 and fake-quant forms): the model's companion file."""
    return Path(f"{model_path}.calib.pth")


def check_output(out: str | Path, inputs: list[str | Path] = (), force: bool = False, flag: str = "--out") -> Path:
    """``out`` may be written: not one of ``inputs`` nor their companions (:func:`sidecar`), not an
    existing file unless ``force``, and in a folder that exists (or can be made) and is writable.
    Checked before any long work; ``flag`` names the option in the messages."""
    out = Path(out)
    for given in inputs:
        if given is None:
            continue
        for path, what in ((Path(given), "also an input"), (sidecar(given), "the calibration record of an input")):
            if path.exists() and out.resolve() == path.resolve():
                raise OutputError(f"{flag} {out} is {what} of this command: choose another output path")
    if out.is_dir():
        raise OutputError(f"{flag} {out} is a folder: give a file path")
    if out.exists() and not force:
        raise OutputError(f"{out} exists: pass --force to overwrite it, or choose another {flag}")
    folder = out.parent
    while not folder.exists():  # the nearest existing ancestor decides whether the folders can be made
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"cannot write {out}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"cannot write {out}: no write permission in {folder}")
    return out


def _umask_mode() -> int:
    """The mode a new file gets from the umask (os.umask is the only way to read it: set and restored)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def write_together(outputs: list[tuple[str | Path, Callable[[Path], None]]], replace: bool = True) -> list[Path]:
    """``write(tmp)`` for each ``(path, write)`` into a temporary file next to ``path``, then move them all
    into place: a failed or interrupted write leaves no half file and every existing ``path`` as it was.
    Files get the umask's permissions (not mkstemp's 0600).

    ``replace=False`` (no --force) claims each path exclusively (a hard link fails if the path exists):
    if another run wrote one meanwhile, it is kept, this run's files are removed and the run fails."""
    paths = [Path(path) for path, _ in outputs]
    temps: list[Path] = []
    try:
        for path, (_, write) in zip(paths, outputs):
            path.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_temporaries(path)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_writer()}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            temps.append(Path(tmp))
            try:
                write(temps[-1])
            except (OSError, RuntimeError) as err:
                if not _disk_full(err):
                    raise
                raise OutputError(f"cannot write {path}: the disk is full ({shutil.disk_usage(path.parent).free // 2**20} "
                                  "MB free); no file was changed: free some space or choose another output path") from None
            os.chmod(tmp, _umask_mode())
        for i, (path, tmp) in enumerate(zip(paths, temps)):
            if replace:
                os.replace(tmp, path)
                continue
            try:
                _claim(tmp, path)
            except FileExistsError:
                for written in paths[:i]:
                    written.unlink()
                raise OutputError(f"{path} appeared while this run was working (another run wrote it): it is kept; "
                                  "pass --force to overwrite it, or choose another output path") from None
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
    return paths


def _claim(tmp: Path, path: Path) -> None:
    """Put ``tmp`` at ``path`` only if no file is there (FileExistsError otherwise): a hard link, or on a
    filesystem without them an exclusive create of ``path`` that ``tmp`` then replaces."""
    try:
        os.link(tmp, path)
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):  # (EEXIST: FileExistsError)
            raise
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        os.replace(tmp, path)


def _writer() -> str:
    """This process in a temporary file's name: host and process id."""
    return f"{platform.node().replace('.', '_')}-{os.getpid()}"


def _remove_stale_temporaries(path: Path) -> None:
    """The temporary files for ``path`` that a killed run (kill -9, power loss) of this host left behind:
    their writer's process is gone."""
    host = _writer().rsplit("-", 1)[0]
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.{glob.escape(host)}-*.tmp"):
        pid = tmp.name[len(f".{path.name}.{host}-"):].split(".")[0]
        if pid.isdigit() and not _running(int(pid)):
            tmp.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _disk_full(err: Exception) -> bool:
    """An error of a full disk (or quota): the OS's, or torch.save's (its zip writer says "unexpected pos"
    or "file write failed" instead)."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    return "unexpected pos" in str(err) or "file write failed" in str(err)


def atomic_write(path: str | Path, write: Callable[[Path], None], replace: bool = True) -> Path:
    """One file by :func:`write_together`."""
    return write_together([(path, write)], replace)[0]


def content_digest(plain, tensors: dict) -> str:
    """SHA-256 of plain data (canonical JSON: sorted keys, exact float reprs) and of named tensors (name,
    dtype, shape, bytes): a file's whole content as loaded, whatever the bytes of its container."""
    digest = hashlib.sha256(json.dumps(plain, sort_keys=True).encode())
    for key in sorted(tensors):
        tensor = tensors[key]
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_data(path: str | Path, what: str, error: type[Exception] = ValueError):
    """``torch.load(path, weights_only=True)`` of a file that is data (tensors and plain values); any failure is
    ``error`` saying in one line what the file is not (:func:`unreadable`)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling failure: say what the file is not
        raise error(unreadable(path, err, what)) from None


def unreadable(path: str | Path, err: Exception, what: str) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in one line. A pickle that holds more than
    tensors and plain values is refused as such: loading it could run code (torch's own message
    offers to load it unsafely, which this project never does)."""
    if isinstance(err, pickle.UnpicklingError) and "Unsupported global" in str(err):
        return (f"{path} is not a {what}: it holds Python objects other than tensors and plain values, and "
                "loading those could run code (refused)")
    if isinstance(err, pickle.UnpicklingError):  # (torch's text here is advice to load it unsafely)
        return f"{path} is not a readable {what}: not a file torch.save wrote, or damaged"
    if Path(path).stat().st_size == 0:
        return f"{path} is empty (0 bytes), not a {what}: an interrupted copy? Copy or write it again"
    if not zipfile.is_zipfile(path):  # torch.save writes zip archives (torch's errors here name no file)
        return f"{path} is not a {what}: not a file torch.save wrote (a text or other file?), or damaged"
    reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
    return f"{path} is not a readable {what}, or is damaged ({type(err).__name__}: {reason})"

"""Output files: checked before the work that produces them, written whole or not at all."""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Callable


class OutputError(ValueError):
    """An output path that must not or cannot be written."""


def check_output(out: str | Path, inputs: list[str | Path] = (), force: bool = False) -> Path:
    """``out`` may be written: not one of ``inputs``, not an existing file unless ``force``, and in a
    folder that exists (or can be made) and is writable. Checked before any long work."""
    out = Path(out)
    for given in inputs:
        if given is not None and Path(given).exists() and out.resolve() == Path(given).resolve():
            raise OutputError(f"--out {out} is also an input of this command: choose another output path")
    if out.is_dir():
        raise OutputError(f"--out {out} is a folder: give a file path")
    if out.exists() and not force:
        raise OutputError(f"{out} exists: pass --force to overwrite it, or choose another --out")
    folder = out.parent
    while not folder.exists():  # the nearest existing ancestor decides whether the folders can be made
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"cannot write {out}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"cannot write {out}: no write permission in {folder}")
    return out


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` into a temporary file next to ``path``, then rename it to ``path``: an interrupted
    or failed write leaves no half file (and an existing ``path`` as it was)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def unreadable(path: str | Path, err: Exception, what: str) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in one line. A pickle that holds more than
    tensors and plain values is refused as such: loading it could run code (torch's own message
    offers to load it unsafely, which this project never does)."""
    if isinstance(err, pickle.UnpicklingError) and "Unsupported global" in str(err):
        return (f"{path} is not a {what}: it holds Python objects other than tensors and plain values, and "
                "loading those could run code (refused)")
    if isinstance(err, pickle.UnpicklingError):  # (torch's text here is advice to load it unsafely)
        return f"{path} is not a readable {what}: not a file torch.save wrote, or damaged"
    reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
    return f"{path} is not a readable {what} ({type(err).__name__}: {reason})"

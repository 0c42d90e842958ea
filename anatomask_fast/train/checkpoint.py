"""Checkpoints that are never lost: written to a temporary file in the same folder,
flushed, then renamed over the old one (atomic on POSIX); a write that fails (read-only
folder, full disk) leaves the previous file intact and raises one error naming the
file. Loaded with ``weights_only=True`` (``anatomask_fast.serialization``): what is saved
is plain (tensors, numbers, strings, lists, tuples, dicts)."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from ..serialization import CheckpointError, safe_load

# How torch's zip writer reports a failed write (full disk, file size limit).
_WRITER_FAILURE = re.compile(
    r"PytorchStreamWriter|unexpected pos|inline_container|file write failed"
)


class WriteError(OSError):
    """A run output that could not be written (the previous version is intact)."""


def file_mode() -> int:
    """The mode a new file gets from ``open``: 0666 less the process's umask (0644 under
    the usual 022). ``mkstemp`` creates 0600, which other users and tools cannot read."""
    with open("/proc/self/status") as status:  # reading it leaves the umask alone
        for line in status:
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    umask = os.umask(0o022)  # not Linux: read it by setting it, then restore it
    os.umask(umask)
    return 0o666 & ~umask


def _atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(handle, file_mode())
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if not isinstance(error, OSError) and not _WRITER_FAILURE.search(str(error)):
            raise  # not the file: e.g. an object that cannot be pickled
        reason = (
            error.strerror
            if isinstance(error, OSError) and error.strerror
            else "the write failed (disk full or file size limit?)"
        )
        intact = " (the previous version is intact)" if path.exists() else ""
        raise WriteError(f"cannot write {path}: {reason}{intact}") from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_save(obj: Any, path: str | Path) -> Path:
    return _atomic_write(path, lambda file: torch.save(obj, file))


def atomic_write_bytes(data: bytes, path: str | Path) -> Path:
    return _atomic_write(path, lambda file: file.write(data))


def atomic_write_text(text: str, path: str | Path) -> Path:
    return atomic_write_bytes(text.encode(), path)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint's dict; FileNotFoundError or CheckpointError naming the file."""
    return safe_load(path, "checkpoint", map_location)


def check_compatible(saved: dict, expected: dict, source: str | Path) -> None:
    """Raises when a checkpoint was written for another model (names the mismatch)."""
    differences = {
        key: (saved.get(key), value) for key, value in expected.items() if saved.get(key) != value
    }
    if differences:
        detail = ", ".join(
            f"{k}: checkpoint has {a!r}, this run has {b!r}" for k, (a, b) in differences.items()
        )
        raise CheckpointError(f"checkpoint {source} does not fit this model ({detail})")

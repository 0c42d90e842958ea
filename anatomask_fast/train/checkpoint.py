"""Checkpoints that are never lost: written to a temporary file in the same folder,
flushed, then renamed over the old one (atomic on POSIX)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def atomic_save(obj: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(text: str, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return torch.load(path, map_location=map_location, weights_only=False)


def check_compatible(saved: dict, expected: dict, source: str | Path) -> None:
    """Raises when a checkpoint was written for another model (names the mismatch)."""
    differences = {key: (saved.get(key), value) for key, value in expected.items()
                   if saved.get(key) != value}
    if differences:
        detail = ", ".join(f"{k}: checkpoint has {a!r}, this run has {b!r}"
                           for k, (a, b) in differences.items())
        raise ValueError(f"checkpoint {source} does not fit this model ({detail})")

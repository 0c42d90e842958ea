"""Loading checkpoint and weight files without running code: ``torch.load`` with
``weights_only=True`` (tensors, numbers, strings and plain containers only), and one
clear error, naming the file, for whatever is not such a file: a foreign pickle (it is
refused before any of its objects is built), a truncated write, a text file.

Lives at the package root so that both ``train`` and ``models`` use it (imports run
train -> models -> ops)."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint or weight file that cannot be used, with the file named."""


def safe_load(
    path: str | Path, what: str = "checkpoint", map_location: str | torch.device = "cpu"
) -> dict:
    """The dict saved in ``path``; ``what`` names the file's role in errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist or is not a file")
    try:
        saved: Any = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # a damaged stream makes the unpickler raise any type
        found = re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)", str(error), re.IGNORECASE)
        if isinstance(error, pickle.UnpicklingError) and (
            found or "Weights only load failed" in str(error)
        ):
            culprit = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"{what} {path} holds Python objects other than tensors and plain "
                f"containers{culprit}; refused without running them (loading them could run "
                "code): only files written by anatomask_fast or plain state dicts load"
            ) from None
        raise CheckpointError(
            f"{what} {path} cannot be read: truncated or not a PyTorch file ({_first_line(error)})"
        ) from None
    if not isinstance(saved, dict):
        raise CheckpointError(
            f"{what} {path} holds a {type(saved).__name__}, expected a dict "
            "(a checkpoint or a state dict)"
        )
    return saved


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__

"""Output allocation for the Triton kernels, the twin of csrc/outputs.h: with
ANATOMASK_POISON_OUTPUTS=1 (set by the test suite) outputs start as NaN (floats) or
-1 (integers), so an element a kernel forgets to write cannot pass as a zero."""

from __future__ import annotations

import os

import torch

POISON = os.environ.get("ANATOMASK_POISON_OUTPUTS") == "1"


def new_output(
    shape: tuple[int, ...] | torch.Size, *, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        if dtype.is_floating_point:
            out.fill_(float("nan"))
        else:
            out.fill_(True if dtype == torch.bool else -1)
    return out

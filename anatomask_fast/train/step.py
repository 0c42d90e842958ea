"""What every training step does around its own computation: seeding the global
generators, autocast, the optimizer step with clipping, the loss check, and the peak
memory it reports. Process set-up is in ``runtime``; the loop in ``loop``."""

from __future__ import annotations

import contextlib
import math
import random
from pathlib import Path

import numpy as np
import torch


def seed_step(seed: int, rank: int, step: int) -> None:
    """Seeds torch's, NumPy's and Python's global generators from (seed, rank, step)
    before a step, so that any draw from them is the same in a resumed run (the
    library's own draws are seeded explicitly; this covers everything else)."""
    # A tag of its own: not the entropy the jobs derive their mask seeds from.
    value = int(np.random.SeedSequence([seed, rank, step, 0x5EED]).generate_state(1)[0])
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)


def autocast(device: torch.device, amp: str):
    """``torch.autocast`` for ``--amp bf16|fp16``; nothing for ``none``."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device.type, dtype=dtype)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is left untouched."""


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    parameters,
    clip: float,
) -> None:
    """Backward (scaled for fp16), gradient clipping at ``clip``, optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(parameters, clip)
    scaler.step(optimizer)
    scaler.update()


def checked_loss(loss: torch.Tensor, epoch: int, step: int, latest: Path) -> float:
    """The loss as a float (the one host sync of a step, for logging); a non-finite
    loss stops the run with the checkpoint that is still intact named."""
    value = loss.item()
    if not math.isfinite(value):
        raise NonFiniteLoss(
            f"the loss became {value} at epoch {epoch}, step {step}; the last "
            f"good checkpoint {latest} is intact (lower --lr or use --amp none)"
        )
    return value


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA allocator peak on GPU; this process's peak RSS (VmHWM) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0

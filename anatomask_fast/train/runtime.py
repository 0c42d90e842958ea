"""Process-level helpers shared by the training jobs: device and torchrun setup, the
run folder, preemption signals, per-step seeding, peak memory, metrics logging."""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import WriteError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> Runtime:
    """Joins the torchrun process group when launched by torchrun (NCCL on CUDA, gloo
    on CPU) and picks this process's device."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return Runtime(torch.device("cuda", local), rank, world_size)
    return Runtime(torch.device(device), rank, world_size)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# Exit status of a run stopped by SIGTERM / SIGUSR1 after writing its checkpoint.
EXIT_PREEMPTED = 3
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """SIGTERM or SIGUSR1 arrived; the latest checkpoint was written after the step."""


class _StopRequest:
    """Remembers a SIGTERM / SIGUSR1 (cluster preemption, wall-time warning) so that the
    training loop stops after the step that is running, not inside it."""

    def __init__(self) -> None:
        self.received: str | None = None

    def handle(self, number: int, frame: Any) -> None:
        self.received = signal.Signals(number).name

    @contextlib.contextmanager
    def installed(self) -> Any:
        self.received = None
        if threading.current_thread() is not threading.main_thread():
            yield               # Python delivers signals to the main thread only
            return
        previous = {number: signal.signal(number, self.handle) for number in STOP_SIGNALS}
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def requested(self, runtime: Runtime) -> bool:
        """True on every rank once any rank got a signal (all stop at the same step)."""
        if not runtime.distributed:
            return self.received is not None
        flag = torch.tensor([self.received is not None], dtype=torch.int32,
                            device=runtime.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


STOP = _StopRequest()


def run_job(config: Any, train: Callable[[Any, Runtime, Path], Path]) -> Path:
    """Resolves ``config``, joins torchrun's process group, creates the run folder and
    calls ``train(config, runtime, out)`` with SIGTERM / SIGUSR1 caught, leaving the
    group however it ends. A run folder this call created is removed again when the run
    fails before writing any checkpoint (no empty run folders)."""
    config = config.resolved()
    runtime = setup(config.device)
    out = Path(config.out)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        teardown()
        raise WriteError(f"cannot create the run folder {out}: {error.strerror}") from None
    try:
        with STOP.installed():
            return train(config, runtime, out)
    except BaseException:
        if created and runtime.main and not any(out.glob("checkpoint_*.pt")):
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        teardown()


def seed_step(seed: int, rank: int, step: int) -> None:
    """Seeds torch's, NumPy's and Python's global generators from (seed, rank, step)
    before a step, so that any draw from them is the same in a resumed run (the
    library's own draws are seeded explicitly; this covers everything else)."""
    # A tag of its own: not the entropy the jobs derive their mask seeds from.
    value = int(np.random.SeedSequence([seed, rank, step, 0x5EED]).generate_state(1)[0])
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is left untouched."""


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler, parameters, clip: float) -> None:
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
        raise NonFiniteLoss(f"the loss became {value} at epoch {epoch}, step {step}; the last "
                            f"good checkpoint {latest} is intact (lower --lr or use --amp none)")
    return value


def finish_step(state: Any, config: Any, runtime: Runtime, metrics: "MetricsLog",
                progress: Any, save_latest: Callable[[], None], values: dict[str, Any],
                postfix: dict[str, str]) -> bool:
    """Counts the step and logs it (metrics.jsonl and the progress bar, with the peak
    memory), writes the latest checkpoint every ``--latest-every-steps`` and before
    stopping; True once ``--stop-after-steps`` is reached; raises Preempted (checkpoint
    written) after a SIGTERM / SIGUSR1."""
    state.step_in_epoch += 1
    state.global_step += 1
    peak = peak_memory_bytes(runtime.device)
    metrics.write(state.global_step, {"epoch": state.epoch, **values,
                                      "peak_memory_mb": peak / 2**20})
    progress.update(1)
    progress.set_postfix(**postfix, mem=f"{peak / 2**30:.2f}G")
    preempted = STOP.requested(runtime)
    stop = bool(config.stop_after_steps and state.global_step >= config.stop_after_steps)
    if preempted or stop or (config.latest_every_steps
                             and state.global_step % config.latest_every_steps == 0):
        save_latest()
    if preempted:
        progress.close()
        raise Preempted(f"stopped by {STOP.received or 'a signal on another rank'} after step "
                        f"{state.global_step}; the checkpoint in {config.out} is written, "
                        "continue with --resume")
    return stop


def autocast(device: torch.device, amp: str):
    """``torch.autocast`` for ``--amp bf16|fp16``; nothing for ``none``."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device.type, dtype=dtype)


def progress_bar(runtime: Runtime, total: int, done: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=done, disable=not runtime.main, file=sys.stdout,
                desc=desc, unit="step", dynamic_ncols=True)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA allocator peak on GPU; this process's peak RSS (VmHWM) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class MetricsLog:
    """JSON lines in ``metrics.jsonl``, and TensorBoard scalars when it is installed."""

    def __init__(self, folder: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.path = folder / "metrics.jsonl"
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(folder / "tensorboard"))
            except ImportError:
                pass

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as file:
            file.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

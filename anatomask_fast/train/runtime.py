"""Process set-up of the training jobs: the device and torchrun's process group, the
run folder, and the preemption signals the loop stops at. What each step does is in
``step``; the loop in ``loop``."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .checkpoint import WriteError
from .config import check as check_config


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
            yield  # Python delivers signals to the main thread only
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
        flag = torch.tensor([self.received is not None], dtype=torch.int32, device=runtime.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


STOP = _StopRequest()


def run_job(config: Any, train: Callable[[Any, Runtime, Path], Path]) -> Path:
    """Resolves ``config``, joins torchrun's process group, creates the run folder and
    calls ``train(config, runtime, out)`` with SIGTERM / SIGUSR1 caught, leaving the
    group however it ends. A run folder this call created is removed again when the run
    fails before writing any checkpoint (no empty run folders)."""
    config = config.resolved()
    check_config(config)
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
            print(
                f"the run folder {out} was removed: no checkpoint had been written (a store "
                "this run built is kept and reused by the next run with the same data and "
                "options)",
                file=sys.stderr,
                flush=True,
            )
        raise
    finally:
        teardown()

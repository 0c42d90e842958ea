"""The one training loop, in the shape of nnU-Net v2's ``run_training``: pretraining and
fine-tuning are each a :class:`Trainer` that defines its data, its ``train_step`` and
what its checkpoints hold, and overrides a few hooks; :func:`run_training` owns the
epochs and steps, resume, the latest checkpoint, preemption signals,
``--stop-after-steps``, the metrics log and the progress bar, once.

Order of one run::

    resume (when --resume), on_train_start
    per epoch:  on_epoch_start, then per step: seed_step, train_step, the step's log,
                the latest checkpoint every --latest-every-steps (and on a stop),
                on_step_end;
                on_train_epoch_end (the epoch's last batch is still at hand),
                the epoch counted, on_epoch_end (validation, exports, epoch
                checkpoints), the latest checkpoint (last: a run killed before it redoes
                this epoch's end)
    on_train_end
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from . import checkpoint as ckpt
from .config import save as save_config
from .progress import progress_bar
from .runtime import STOP, Preempted, Runtime, run_job
from .sampling import BatchOrder, RandomCrops, epoch_loader
from .step import checked_loss, peak_memory_bytes, seed_step


@dataclasses.dataclass
class TrainState:
    """Where a run stands; saved under ``state`` in every checkpoint."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0


class StepLog(NamedTuple):
    """What a ``train_step`` reports: the loss (synchronized once, by the loop), the
    batch size, values for ``metrics.jsonl`` and labelled values for the progress bar."""

    loss: torch.Tensor
    batch_size: int
    values: dict[str, Any]
    shown: dict[str, str]


class Trainer:
    """One job's part of the loop. Subclasses set ``data`` (the training crops) and
    ``sampler`` (their batch order), ``steps_per_epoch``, ``state`` (a
    :class:`TrainState`, possibly with more fields), ``signature`` (what a checkpoint
    must match to be resumed), ``optimizer`` and ``scaler``, and define
    :meth:`train_step` and :meth:`modules`; the ``on_*`` hooks do nothing unless
    overridden, but ``on_train_start``, which writes ``config.json``."""

    job = "train"  # the progress bar's and the messages' name
    loss_label = "loss"  # how the progress bar labels the loss
    data: RandomCrops
    sampler: BatchOrder
    steps_per_epoch: int
    state: TrainState
    signature: dict
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler

    def __init__(self, config: Any, runtime: Runtime, out: Path) -> None:
        self.config, self.runtime, self.out = config, runtime, out
        self.latest = out / "checkpoint_latest.pt"
        self.progress: Any = None
        self.metrics: MetricsLog | None = None

    def say(self, *parts: Any) -> None:
        """A line on stdout from the main process (through the progress bar when one
        is shown, so that the bar stays whole)."""
        if not self.runtime.main:
            return
        line = " ".join(str(p) for p in parts)
        if self.progress is not None:
            self.progress.write(line)
        else:
            print(line, flush=True)

    # ---- what a trainer defines
    def train_step(self, batch: dict) -> StepLog:
        raise NotImplementedError

    def modules(self) -> dict[str, torch.nn.Module]:
        """The modules a checkpoint holds, by their key in it."""
        raise NotImplementedError

    def checkpoint(self) -> dict:
        """Everything a checkpoint holds besides the loop's ``state``: the signature,
        the modules' weights, the optimizer, the gradient scaler and the config."""
        return {
            **self.signature,
            **{key: m.state_dict() for key, m in self.modules().items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "config": dataclasses.asdict(self.config),
        }

    def load_checkpoint(self, saved: dict, path: Path) -> None:
        """Restores from a checkpoint (the loop restores ``state``); a CheckpointError
        when it was written for another model."""
        ckpt.check_compatible(saved, self.signature, path)
        for key, module in self.modules().items():
            module.load_state_dict(saved[key])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scaler.load_state_dict(saved["scaler"])

    # ---- hooks
    def on_train_start(self) -> None:
        if self.runtime.main:
            save_config(self.config, self.out / "config.json")

    def on_epoch_start(self) -> None: ...

    def on_step_end(self) -> None: ...

    def on_train_epoch_end(self) -> None: ...

    def on_epoch_end(self) -> None: ...

    def on_train_end(self) -> None: ...

    # ---- provided
    def batches(self, epoch: int, start_step: int) -> Iterable[dict]:
        """The epoch's batches from ``start_step`` on (a resumed epoch skips the rest)."""
        return epoch_loader(
            self.data, self.sampler, epoch=epoch, start_step=start_step, workers=self.config.workers
        )

    def save(self, path: Path) -> None:
        if self.runtime.main:
            ckpt.atomic_save({**self.checkpoint(), "state": dataclasses.asdict(self.state)}, path)

    def resume(self) -> None:
        saved = ckpt.load(self.latest)
        self.load_checkpoint(saved, self.latest)
        self.state = type(self.state)(**saved["state"])
        self.say(
            f"  resumed from {self.latest} at epoch {self.state.epoch + 1} of "
            f"{self.config.epochs}, step {self.state.global_step} of "
            f"{self.config.epochs * self.steps_per_epoch}"
        )

    def log(self, values: dict[str, Any]) -> None:
        """One line of ``metrics.jsonl`` at the current step."""
        self.metrics.write(self.state.global_step, values)


def train(trainer_type: type[Trainer], config: Any) -> Path:
    """Runs a job: the process set-up and run folder of ``runtime.run_job``, then
    ``trainer_type``'s run in the loop."""
    return run_job(
        config, lambda config, runtime, out: run_training(trainer_type(config, runtime, out))
    )


def run_training(trainer: Trainer) -> Path:
    """Runs ``trainer`` from its state (or its latest checkpoint with ``--resume``) to
    the last epoch, ``--stop-after-steps`` or a preemption signal; returns the run
    folder."""
    config, runtime = trainer.config, trainer.runtime
    if config.resume:
        trainer.resume()
    trainer.metrics = MetricsLog(trainer.out, runtime.main)
    trainer.on_train_start()
    total = config.epochs * trainer.steps_per_epoch
    trainer.progress = progress_bar(
        total, trainer.job, "step", done=trainer.state.global_step, enabled=runtime.main
    )
    try:
        while trainer.state.epoch < config.epochs:
            state = trainer.state
            batches = iter(trainer.batches(state.epoch, state.step_in_epoch))
            trainer.on_epoch_start()
            while state.step_in_epoch < trainer.steps_per_epoch:
                batch = next(batches)
                seed_step(config.seed, runtime.rank, state.global_step)
                started = time.perf_counter()
                step = trainer.train_step(batch)
                loss = checked_loss(step.loss, state.epoch, state.global_step, trainer.latest)
                seconds = time.perf_counter() - started
                stop = _finish_step(trainer, loss, step, seconds)
                trainer.on_step_end()
                if stop:
                    trainer.progress.close()
                    trainer.progress = None
                    trainer.say(
                        f"  stopped after step {state.global_step} of {total} "
                        f"(--stop-after-steps): {trainer.latest} written; continue "
                        "with the same command and --resume"
                    )
                    return trainer.out
            trainer.on_train_epoch_end()
            state.epoch += 1
            state.step_in_epoch = 0
            trainer.on_epoch_end()
            trainer.save(trainer.latest)
        trainer.progress.close()
        trainer.progress = None
        trainer.on_train_end()
    finally:
        if trainer.progress is not None:
            trainer.progress.close()
            trainer.progress = None
        trainer.metrics.close()
    return trainer.out


def _finish_step(trainer: Trainer, loss: float, step: StepLog, seconds: float) -> bool:
    """Counts the step and logs it (metrics.jsonl and the progress bar, with the peak
    memory), writes the latest checkpoint every ``--latest-every-steps`` and before
    stopping; True once ``--stop-after-steps`` is reached; raises Preempted (checkpoint
    written) after a SIGTERM / SIGUSR1."""
    config, runtime, state = trainer.config, trainer.runtime, trainer.state
    state.step_in_epoch += 1
    state.global_step += 1
    peak = peak_memory_bytes(runtime.device)
    trainer.log(
        {
            "epoch": state.epoch,
            "loss": loss,
            **step.values,
            "batch_size": step.batch_size,
            "step_seconds": seconds,
            "samples_per_second": step.batch_size / seconds,
            "peak_memory_mb": peak / 2**20,
        }
    )
    trainer.progress.set_postfix(
        {
            "epoch": f"{state.epoch + 1}/{config.epochs}",
            trainer.loss_label: f"{loss:.4f}",
            **step.shown,
            "vol/s": f"{step.batch_size * runtime.world_size / seconds:.2f}",
            "peak mem": f"{peak / 2**30:.2f}G",
        },
        refresh=False,
    )
    trainer.progress.update(1)  # shows this step's values
    preempted = STOP.requested(runtime)
    stop = bool(config.stop_after_steps and state.global_step >= config.stop_after_steps)
    if (
        preempted
        or stop
        or (config.latest_every_steps and state.global_step % config.latest_every_steps == 0)
    ):
        trainer.save(trainer.latest)
    if preempted:
        raise Preempted(
            f"stopped by {STOP.received or 'a signal on another rank'} after step "
            f"{state.global_step}; the checkpoint {trainer.latest} is written, "
            "continue with the same command and --resume"
        )
    return stop


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

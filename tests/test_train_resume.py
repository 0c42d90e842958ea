"""Kill and resume: a pretraining run interrupted at random moments (SIGKILL of the
whole process group, SIGTERM, SIGUSR1), each time a little after a checkpoint write,
and resumed each time, ends bit-identical to an uninterrupted run: weights, teacher,
optimizer, step counters, encoder export. The epochs are longer than a pass over the
data (3 cases, batch 2, 4 steps an epoch: short batches and a restarted pass inside
each epoch), the path the resume used to get wrong; the first stop is always at step 3
(--stop-after-steps), just after the pass restarted, where it went wrong.

ANATOMASK_RESUME_INTERRUPTIONS (default 2) sets how many interruptions a run gets
(``scripts/kill_and_resume.sh`` runs a long version); the random seed of the timings
is printed on failure."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from anatomask_fast.train.runtime import EXIT_PREEMPTED

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [
    "pretrain",
    "--size",
    "tiny",
    "--crop",
    "32",
    "32",
    "32",
    "--batch-size",
    "2",
    "--phantom-cases",
    "3",
    "--steps-per-epoch",
    "4",
    "--epochs",
    "2",
    "--latest-every-steps",
    "1",
    "--preview-every",
    "0",
    "--save-every",
    "0",
]
INTERRUPTIONS = int(os.environ.get("ANATOMASK_RESUME_INTERRUPTIONS", "2"))
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def launch(out: Path, workers: int, *extra: str) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "anatomask_fast.train",
        *SETTINGS,
        "--out",
        str(out),
        "--workers",
        str(workers),
        *extra,
    ]
    return subprocess.Popen(
        command,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )  # its own process group


def written_at(path: Path) -> int:
    return path.stat().st_mtime_ns if path.exists() else 0


def interrupted_run(
    out: Path, workers: int, plan: list[signal.Signals], rng: random.Random
) -> list[str]:
    """Runs to the end, interrupted by each signal of ``plan`` (to the whole process
    group, as a scheduler or a node failure does) at a random time after a checkpoint
    write; returns what happened, for the failure message."""
    latest = out / "checkpoint_latest.pt"
    process = launch(out, workers, "--stop-after-steps", "3")
    assert process.wait(timeout=300) == 0, process.communicate()[1][-3000:]
    assert torch.load(latest, weights_only=True)["state"] == {
        "epoch": 0,
        "step_in_epoch": 3,
        "global_step": 3,
    }
    log = ["--stop-after-steps 3"]
    for number in plan:
        before = written_at(latest)
        process = launch(out, workers, "--resume")
        while process.poll() is None and written_at(latest) == before:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 1.5))
        if process.poll() is None:
            os.killpg(process.pid, number)
        code = process.wait(timeout=300)
        _, errors = process.communicate()
        step = torch.load(latest, weights_only=True)["state"]["global_step"]
        log.append(f"{number.name} -> exit {code}, checkpoint at step {step}")
        if code == 0:  # it ended before the signal came
            return log
        expected = -signal.SIGKILL if number == signal.SIGKILL else EXIT_PREEMPTED
        assert code == expected, (log, errors[-3000:])
        if number != signal.SIGKILL:
            assert f"stopped by {number.name} after step {step}" in errors, errors[-3000:]
    process = launch(out, workers, "--resume")
    code = process.wait(timeout=300)
    assert code == 0, (log, process.communicate()[1][-3000:])
    return log


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    process = launch(out, 0)
    assert process.wait(timeout=300) == 0, process.communicate()[1][-3000:]
    return out


def assert_identical(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize(
    "workers, plan",
    [
        (0, [signal.SIGKILL, signal.SIGUSR1, signal.SIGKILL, signal.SIGTERM]),
        (2, [signal.SIGKILL, signal.SIGTERM, signal.SIGKILL, signal.SIGUSR1]),
    ],
)
def test_interrupted_run_is_bit_identical(tmp_path, uninterrupted, workers, plan):
    straight = torch.load(uninterrupted / "checkpoint_latest.pt", weights_only=True)
    seed = random.randrange(2**32)
    plan = (plan * INTERRUPTIONS)[:INTERRUPTIONS]
    log = interrupted_run(tmp_path, workers, plan, random.Random(seed))
    resumed = torch.load(tmp_path / "checkpoint_latest.pt", weights_only=True)
    context = f"timing seed {seed}: {log}"
    assert (
        resumed["state"] == straight["state"] == {"epoch": 2, "step_in_epoch": 0, "global_step": 8}
    ), context
    for key in ("model", "teacher", "optimizer", "scaler"):
        assert_identical(resumed[key], straight[key], f"{context}: {key}")
    assert_identical(
        torch.load(tmp_path / "encoder.pt", weights_only=True),
        torch.load(uninterrupted / "encoder.pt", weights_only=True),
        f"{context}: encoder.pt",
    )

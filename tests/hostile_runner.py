"""Runs hostile cases (tests/hostile_cases.py) in this process and records each
outcome, so that a parent can run them all in one child and still learn which case
killed it: ``python -m tests.hostile_runner RESULTS.jsonl NAME...``.

Before a case runs, its name is written (and flushed) to RESULTS.jsonl as a
``started`` line; after it, the outcome line. A case that kills the process leaves
its ``started`` line last; ``run_cases`` then records it as a crash and starts a
fresh child for the cases after it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SELFTEST_CRASH = "ANATOMASK_HOSTILE_SELFTEST_CRASH"


def _outcome(name: str) -> dict:
    import torch  # noqa: F401  (imported once, before the first case)

    import anatomask_fast.kernels.gather_scatter  # noqa: F401  (registers the Triton ops)
    import anatomask_fast.kernels.mask_select  # noqa: F401
    import anatomask_fast.kernels.packing  # noqa: F401
    import anatomask_fast.kernels.patch_loss  # noqa: F401
    import anatomask_fast.kernels.seg_loss  # noqa: F401
    from anatomask_fast import use_backend
    from tests.hostile_cases import CASES, RAW_BACKENDS, ops

    if name == os.environ.get(SELFTEST_CRASH):  # the runner's own test: die as a segfault
        os.kill(os.getpid(), signal.SIGSEGV)
    base, _, backend = name.partition("@")
    case = CASES[base]
    ops.suffix = "" if case.public else RAW_BACKENDS[backend]
    try:
        with use_backend(backend if case.public else "auto"):
            case.call()
    except Exception as error:  # noqa: BLE001 - every outcome is recorded
        return {"name": name, "error": type(error).__name__, "message": str(error)}
    return {"name": name, "error": None, "message": ""}


def main(out: str, names: list[str]) -> None:
    with open(out, "a") as log:
        for name in names:
            log.write(json.dumps({"started": name}) + "\n")
            log.flush()
            os.fsync(log.fileno())
            log.write(json.dumps(_outcome(name)) + "\n")
            log.flush()


def run_cases(
    names: list[str], out: Path, env: dict[str, str] | None = None, timeout: float = 600
) -> dict[str, dict]:
    """Outcome of every case, running them in as few child processes as crashes allow
    (a crash is recorded as error 'crash' with the child's exit status)."""
    results: dict[str, dict] = {}
    pending = list(names)
    child_env = {
        **os.environ,
        "ANATOMASK_POISON_OUTPUTS": "1",
        "OMP_NUM_THREADS": "1",
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1"),
        **(env or {}),
    }
    while pending:
        out.unlink(missing_ok=True)
        proc = subprocess.run(
            [sys.executable, "-m", "tests.hostile_runner", str(out), *pending],
            cwd=ROOT,
            env=child_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        started = None
        for line in out.read_text().splitlines() if out.exists() else []:
            record = json.loads(line)
            if "started" in record:
                started = record["started"]
            else:
                results[record["name"]] = record
                started = None
        if proc.returncode == 0 and started is None:
            break
        if started is None:  # died outside any case (import error, ...)
            raise RuntimeError(
                f"hostile runner failed (exit {proc.returncode}): {proc.stderr[-3000:]}"
            )
        results[started] = {
            "name": started,
            "error": "crash",
            "message": f"exit status {proc.returncode}: {proc.stderr[-2000:]}",
        }
        pending = pending[pending.index(started) + 1 :]
    return results


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])

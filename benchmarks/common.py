"""Shared benchmark machinery: sizes (realistic, or small in quick mode), backends to
compare, and peak memory measured in a fresh process.

Every benchmark module defines ``setup_<case>(backend, size, device) -> run``: it
allocates the inputs and returns a zero-argument callable doing one forward and
backward. Time comes from pytest-benchmark; memory from ``peak_extra_memory``: the
peak beyond the inputs, as peak RSS of a fresh process (CPU) or the CUDA allocator's
peak (GPU).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import anatomask_fast

QUICK = os.environ.get("ANATOMASK_BENCH_QUICK") == "1"
ROOT = Path(__file__).resolve().parents[1]


def sizes(full: dict[str, dict], quick: dict[str, dict]) -> list:
    """pytest params of named sizes: the realistic ones, or the quick ones for CI."""
    chosen = quick if QUICK else full
    return [pytest.param({"name": name, **value}, id=name) for name, value in chosen.items()]


def backend_devices(op: anatomask_fast.dispatch.Op) -> list:
    """(backend, device) pairs worth timing here: the reference and every available
    compiled backend; Triton only on a GPU (the interpreter is not a speed path)."""
    report = anatomask_fast.backends()
    pairs = [("reference", "cpu")]
    if report["cpu"].available and op.cpp:
        pairs.append(("cpu", "cpu"))
    if torch.cuda.is_available():
        pairs.append(("reference", "cuda"))
        if report["cuda"].available and op.cpp:
            pairs.append(("cuda", "cuda"))
        if report["triton"].available and op.triton:
            pairs.append(("triton", "cuda"))
    return [pytest.param(b, d, id=f"{b}-{d}") for b, d in pairs]


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_it(benchmark, run: Callable[[], None], device: str, rounds: int = 5) -> None:
    def timed() -> None:
        run()
        synchronize(device)

    benchmark.pedantic(timed, rounds=2 if QUICK else rounds, iterations=1, warmup_rounds=1)


def _rss_peak_bytes() -> int:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries that over from the
    parent through fork and exec, so a child of a large pytest process would start
    with the parent's peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM missing from /proc/self/status")


def _measure_here(module: str, case: str, backend: str, size: dict, device: str) -> int:
    setup = getattr(__import__(f"benchmarks.{module}", fromlist=[case]), f"setup_{case}")
    if device == "cuda":
        torch.cuda.synchronize()
        run = setup(backend, size, device)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    run = setup(backend, size, device)
    before = _rss_peak_bytes()
    run()
    return max(0, _rss_peak_bytes() - before)


def peak_extra_memory(module: str, case: str, backend: str, size: dict, device: str) -> int:
    """Bytes one forward+backward needs beyond its inputs, measured in a fresh process."""
    spec = json.dumps(dict(module=module, case=case, backend=backend, size=size, device=device))
    out = subprocess.run([sys.executable, "-m", "benchmarks.common", spec], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def record(benchmark, *, module: str, case: str, backend: str, size: dict, device: str,
           run: Callable[[], None]) -> None:
    """Times ``run`` and stores the fresh-process peak memory next to the time."""
    time_it(benchmark, run, device)
    benchmark.extra_info.update(
        backend=backend, device=device, case=case, size=size,
        peak_extra_bytes=peak_extra_memory(module, case, backend, size, device))


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    with anatomask_fast.use_backend(spec["backend"]):
        print(_measure_here(spec["module"], spec["case"], spec["backend"], spec["size"],
                            spec["device"]))

"""Shared benchmark machinery: sizes (realistic, or small in quick mode), backends to
compare, and peak memory measured in a fresh process.

Every benchmark module defines ``setup_<case>(backend, size, device) -> run``: it
allocates the inputs and returns a zero-argument callable doing one forward and
backward (memory-bound ops also set ``run.bytes_moved``: the bytes the op must read
and write; ``run.extra_info()`` may return more to record), and makes its pytest test
with :func:`benchmark_test`. Time comes from
pytest-benchmark; memory from ``peak_extra_memory``: the peak beyond the inputs, as
peak RSS of a fresh process (CPU) or the CUDA allocator's peak (GPU); on a GPU the
achieved bandwidth is also recorded, as a fraction of the device's copy bandwidth.
"""

from __future__ import annotations

import functools
import importlib
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


def sizes(
    full: dict[str, dict], quick: dict[str, dict], gpu: dict[str, dict] | None = None
) -> list:
    """pytest params of named sizes: the realistic ones, or the quick ones for CI.
    ``gpu`` sizes (the issues' GPU configurations, too large for a CPU) run on CUDA
    devices only; the others run everywhere."""
    chosen = (
        quick
        if QUICK
        else {
            **full,
            **{name: {**value, "only_device": "cuda"} for name, value in (gpu or {}).items()},
        }
    )
    return [pytest.param({"name": name, **value}, id=name) for name, value in chosen.items()]


def skip_other_device(size: dict, device: str) -> None:
    """Skips a GPU-only size on the CPU."""
    if size.get("only_device", device) != device:
        pytest.skip(f"size {size['name']} is for {size['only_device']} only")


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


def training_step_pairs() -> list:
    """The reference-faithful execution and the library's, on CPU and (when present)
    on the GPU: the pairs of the training-step benchmarks."""
    pairs = [
        pytest.param("reference", "cpu", id="reference-cpu"),
        pytest.param("cpu", "cpu", id="fast-cpu"),
    ]
    if torch.cuda.is_available() and anatomask_fast.backends()["cuda"].available:
        pairs += [
            pytest.param("reference", "cuda", id="reference-cuda"),
            pytest.param("cuda", "cuda", id="fast-cuda"),
        ]
    return pairs


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_it(benchmark, run: Callable[[], None], device: str, rounds: int = 5) -> None:
    def timed() -> None:
        run()
        synchronize(device)

    benchmark.pedantic(timed, rounds=2 if QUICK else rounds, iterations=1, warmup_rounds=1)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _rss_peak_bytes() -> int:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries that over from the
    parent through fork and exec, so a child of a large pytest process would start
    with the parent's peak."""
    return _status_bytes("VmHWM")


def _rss_bytes() -> int:
    return _status_bytes("VmRSS")


def _measure_here(module: str, case: str, backend: str, size: dict, device: str) -> int:
    setup = getattr(importlib.import_module(f"benchmarks.{module}"), f"setup_{case}")
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
    # The steady state, as on a GPU (measured after the timing's warm-up): one call
    # first, so that one-time costs (code pages of a lazily loaded library, oneDNN's
    # primitive caches) are not counted, then the peak RSS is reset to the current RSS.
    run()
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        before = _rss_bytes()
    except OSError:  # no reset allowed here: the second call's growth over the first
        before = _rss_peak_bytes()
    run()
    return max(0, _rss_peak_bytes() - before)


def peak_extra_memory(module: str, case: str, backend: str, size: dict, device: str) -> int:
    """Bytes one forward+backward needs beyond its inputs, in the steady state (a call
    after a first one): the CUDA allocator's peak (per process and resettable, so
    measured here), or on CPU the peak RSS of a fresh process."""
    if device == "cuda":
        with anatomask_fast.use_backend(backend):
            return _measure_here(module, case, backend, size, device)
    spec = json.dumps(dict(module=module, case=case, backend=backend, size=size, device=device))
    # A fixed mmap threshold: glibc otherwise raises it after the first large free and
    # keeps later freed tensors in the heap, so RSS would count allocator retention
    # instead of live memory (and vary from run to run).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.common", spec],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


@functools.cache
def copy_bandwidth(device: str) -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    source = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        target.copy_(source)
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * source.numel() / (start.elapsed_time(end) / 1e3)


def kernel_seconds(run: Callable[[], None], repeats: int = 5) -> float:
    """Seconds the device spends in kernels (and device copies) per call of ``run``,
    from the profiler: the call's time without the host's Python, dispatch and launch
    overhead, which dominates small ops on a fast GPU."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            run()
        torch.cuda.synchronize()
    busy_us = sum(
        event.self_device_time_total
        for event in prof.key_averages()
        if event.device_type == DeviceType.CUDA
    )
    return busy_us / 1e6 / repeats


def record(
    benchmark,
    *,
    module: str,
    case: str,
    backend: str,
    size: dict,
    device: str,
    run: Callable[[], None],
) -> None:
    """Times ``run`` and stores its peak memory (:func:`peak_extra_memory`; on a GPU also
    the achieved share of the copy bandwidth, per call and per kernel time) next to the
    time."""
    time_it(benchmark, run, device)
    benchmark.extra_info.update(
        backend=backend,
        device=device,
        case=case,
        size=size,
        peak_extra_bytes=peak_extra_memory(module, case, backend, size, device),
    )
    extra = getattr(run, "extra_info", None)  # e.g. per-phase times of the timed calls
    if extra is not None:
        benchmark.extra_info.update(extra())
    moved = getattr(run, "bytes_moved", None)
    if device == "cuda" and moved:
        copy = copy_bandwidth(device)
        kernels = kernel_seconds(run)
        benchmark.extra_info.update(
            bandwidth_fraction=moved / benchmark.stats.stats.median / copy,
            kernel_bandwidth_fraction=moved / kernels / copy if kernels > 0 else None,
        )


def benchmark_test(module: str, case: str, title: str, size_params: list, pairs: list) -> Callable:
    """The pytest test of ``benchmarks.<module>.setup_<case>``: every size against
    every (backend, device) pair, grouped as ``"<title> <size name>"``."""

    @pytest.mark.parametrize("size", size_params)
    @pytest.mark.parametrize("backend,device", pairs)
    def test(benchmark, backend: str, device: str, size: dict) -> None:
        skip_other_device(size, device)
        benchmark.group = f"{title} {size['name']}"
        setup = getattr(importlib.import_module(f"benchmarks.{module}"), f"setup_{case}")
        record(
            benchmark,
            module=module,
            case=case,
            backend=backend,
            size=size,
            device=device,
            run=setup(backend, size, device),
        )

    return test


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    with anatomask_fast.use_backend(spec["backend"]):
        print(
            _measure_here(
                spec["module"], spec["case"], spec["backend"], spec["size"], spec["device"]
            )
        )

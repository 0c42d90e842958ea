"""Where the peak memory (and the device time) of a benchmark call is: ``python -m
benchmarks.memory_timeline MODULE CASE --backend B --size JSON [--device D] [--kernels N]``.

Profiles one call (after a first one, as the benchmarks measure the steady state) with
the profiler's allocation events and sums them in time order: the peak of live tensor
bytes, the live bytes when backward starts, the ops running at the peak (outermost
first) and the largest allocations of the last ``--window`` ms before it; with ``--kernels N`` also the N ops that took the most device
time (self time, on a GPU the kernels). Tensor bytes
are what the CUDA allocator's peak counts (less cuDNN's workspace), so a CPU run also
estimates a GPU configuration's memory ratio; peak RSS (the benchmarks' CPU number)
adds the allocator's own overhead.

    python -m benchmarks.memory_timeline bench_pretrain_step pretrain_step --backend cpu \\
        --size '{"model": "B", "B": 2, "spatial": [112, 112, 128]}'
"""

from __future__ import annotations

import argparse
import importlib
import json
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

import anatomask_fast

MIB = 2**20


@dataclass
class Timeline:
    peak: int  # bytes
    at_backward_start: int | None  # bytes; None without autograd
    ops_at_peak: list[str]  # outermost first
    allocations_before_peak: list[tuple[float, int, str]]  # (ms before the peak, bytes, op)
    busiest: list[tuple[str, float, int]]  # (op or kernel, self device ms, calls), most first


def timeline(run, device: str, window_ms: float = 300.0, min_bytes: int = 8 * MIB) -> Timeline:
    run()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, profile_memory=True) as prof:
        run()
    events = list(prof.profiler.kineto_results.events())
    kind = torch.autograd.DeviceType.CUDA if device == "cuda" else torch.autograd.DeviceType.CPU
    memory = sorted(
        (e.start_ns(), e.nbytes())
        for e in events
        if e.name() == "[memory]" and e.device_type() == kind
    )
    ops = [e for e in events if e.name() != "[memory]"]
    live = peak = peak_ns = 0
    for t, nbytes in memory:
        live += nbytes
        if live > peak:
            peak, peak_ns = live, t

    def running(t: int) -> list:
        return sorted(
            (e for e in ops if e.start_ns() <= t <= e.start_ns() + e.duration_ns()),
            key=lambda e: e.start_ns(),
        )

    backward = min(
        (e.start_ns() for e in ops if e.name().startswith("autograd::engine")), default=None
    )
    at_backward = None if backward is None else sum(b for t, b in memory if t < backward)
    recent = [
        ((peak_ns - t) / 1e6, b, " > ".join(e.name() for e in running(t)[-2:]))
        for t, b in memory
        if 0 <= peak_ns - t <= window_ms * 1e6 and b >= min_bytes
    ]
    return Timeline(
        peak,
        at_backward,
        [e.name() for e in running(peak_ns)],
        sorted(recent, key=lambda r: -r[1])[:12],
        busiest(prof, device),
    )


def busiest(prof, device: str) -> list[tuple[str, float, int]]:
    """Self time per op on the CPU, or per kernel and device copy on a GPU (the device's
    own events only: an op's device time repeats its kernels'), most first."""
    if device == "cuda":
        rows = [
            (e.key, e.self_device_time_total / 1e3, e.count)
            for e in prof.key_averages()
            if e.device_type == torch.autograd.DeviceType.CUDA
        ]
    else:
        rows = [(e.key, e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()]
    return sorted((r for r in rows if r[1] > 0), key=lambda r: -r[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", help="benchmark module, e.g. bench_pretrain_step")
    parser.add_argument("case", help="its case, e.g. pretrain_step (setup_<case>)")
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--size", required=True, help="the size dict, as JSON")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--window", type=float, default=300.0, help="ms before the peak")
    parser.add_argument(
        "--kernels", type=int, default=0, help="also list the N ops with the most self device time"
    )
    args = parser.parse_args(argv)
    setup = getattr(importlib.import_module(f"benchmarks.{args.module}"), f"setup_{args.case}")
    size = json.loads(args.size)
    with anatomask_fast.use_backend(args.backend):
        found = timeline(setup(args.backend, size, args.device), args.device, args.window)
    print(
        f"{args.module}.{args.case} {args.backend} {size} on {args.device}: "
        f"peak {found.peak / MIB:.0f} MiB of live tensors"
    )
    if found.at_backward_start is not None:
        print(f"  at the start of backward: {found.at_backward_start / MIB:.0f} MiB")
    print("  running at the peak: " + " > ".join(found.ops_at_peak))
    for before, nbytes, op in found.allocations_before_peak:
        print(f"  {before:8.1f} ms before: {nbytes / MIB:+8.1f} MiB  {op}")
    if args.kernels:
        total = sum(ms for _, ms, _ in found.busiest)
        print(f"  self time on {args.device} {total:.1f} ms in all; the {args.kernels} largest:")
        for name, ms, calls in found.busiest[: args.kernels]:
            print(f"  {ms:9.2f} ms {ms / total:6.1%} {calls:6d}x  {name[:100]}")


if __name__ == "__main__":
    main()

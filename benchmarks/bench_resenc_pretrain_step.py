"""One pretraining step on nnU-Net's Residual Encoder U-Net: the library's execution
(packed residual encoder, fused ops, lean light decoder) against the dense masked
execution of the same network, SparK3D's way as nnssl runs it (dense convolutions with
masked outputs, gather / scatter sparse norms, the plain decoder:
``reference_execution``). At mask ratio 0.6 AnatoMask's step (teacher pass, anatomical
mask, student forward and backward), at 0.75 SparK's (nnssl's ratio: random masks, the
student only).

Networks: ResEnc-M as nnUNetPlannerResEncM plans it for 64^3 and 96^3 patches (five
stages, the preset's first five: 32-320 wide, 1, 3, 4, 6, 6 blocks), ResEnc-L the
six-stage preset (nnssl's ResEnc-L). On a GPU also ResEnc-L at 1x128^3 under bf16.

Not timed: the optimizer step (the same AdamW for both). Memory: the peak beyond the
models and the input batch (a fresh process's, see ``common.peak_extra_memory``).

Standalone, alternating the two executions in one process (times) and fresh
processes (memory), with the spread over repeats::

    python -m benchmarks.bench_resenc_pretrain_step SIZE [REPEATS [MEMORY_REPEATS]]
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time

import torch

from anatomask_fast.models.networks import NetworkSpec, pretraining_network
from anatomask_fast.models.resenc import RESENC_PRESETS, ResEncArch

from .bench_pretrain_step import step_runner
from .common import benchmark_test, peak_extra_memory, sizes, training_step_pairs

_L = RESENC_PRESETS["resenc-l"].arch
NETWORKS = {
    # nnUNetPlannerResEncM's network for a 64^3 or 96^3 patch: five stages (the edge of
    # the deepest map stays >= 4), the preset's first five.
    "ResEnc-M": dataclasses.replace(
        _L,
        features=_L.features[:5],
        kernels=_L.kernels[:5],
        strides=_L.strides[:5],
        blocks=_L.blocks[:5],
        decoder_convs=_L.decoder_convs[:4],
    ),
    "ResEnc-L": _L,
    "ResEnc-tiny": ResEncArch(
        features=(8, 16, 32, 32, 32),
        kernels=((3, 3, 3),) * 5,
        strides=((1, 1, 1),) + ((2, 2, 2),) * 4,
        blocks=(1, 2, 2, 2, 2),
        decoder_convs=(1,) * 4,
    ),
}
# Ratio 0.6: AnatoMask's step (hard_frac 0.25, mid-schedule); 0.75: SparK's (no teacher).
METHODS = {0.6: 0.25, 0.75: None}


def _sizes(net: str, side: int, ratios=(0.6, 0.75), **extra) -> dict:
    amp = f"-{extra['amp']}" if "amp" in extra else ""
    return {
        f"{net}-B2-1x{side}x{side}x{side}{amp}-r{r}": dict(
            net=net, B=2, spatial=(side,) * 3, ratio=r, **extra
        )
        for r in ratios
    }


SIZES = sizes(
    full={**_sizes("ResEnc-M", 64), **_sizes("ResEnc-M", 96), **_sizes("ResEnc-L", 64)},
    # CI: a narrow network and decoder (64 wide), AnatoMask's step only.
    quick=_sizes("ResEnc-tiny", 32, ratios=(0.6,), decoder=64),
    gpu=_sizes("ResEnc-L", 128, amp="bf16"),
)


def setup_resenc_pretrain_step(backend: str, size: dict, device: str):
    torch.manual_seed(0)
    spec = NetworkSpec("resenc", "", NETWORKS[size["net"]], size["spatial"])
    student = pretraining_network(
        spec, 1, **({"decoder_width": size["decoder"]} if "decoder" in size else {})
    ).to(device)
    return step_runner(
        student, size, backend, device, mask_ratio=size["ratio"], hard_frac=METHODS[size["ratio"]]
    )


test_resenc_pretrain_step = benchmark_test(
    "bench_resenc_pretrain_step",
    "resenc_pretrain_step",
    "ResEnc pretrain step",
    SIZES,
    training_step_pairs(),
)


def alternating(name: str, repeats: int = 3, memory_repeats: int = 1) -> None:
    """Time: the two executions alternately in one process (a warm-up call each, then
    ``repeats`` rounds); memory: ``memory_repeats`` fresh processes per execution.
    Prints each measurement and the ratios' spread."""
    size = next(p.values[0] for p in SIZES if p.values[0]["name"] == name)
    memory = {
        backend: [
            peak_extra_memory(
                "bench_resenc_pretrain_step", "resenc_pretrain_step", backend, size, "cpu"
            )
            for _ in range(memory_repeats)
        ]
        for backend in ("reference", "cpu")
    }
    runs = {
        backend: setup_resenc_pretrain_step(backend, size, "cpu")
        for backend in ("reference", "cpu")
    }
    for run in runs.values():
        run()
    seconds: dict[str, list[float]] = {backend: [] for backend in runs}
    for _ in range(repeats):
        for backend, run in runs.items():
            started = time.perf_counter()
            run()
            seconds[backend].append(time.perf_counter() - started)
    ratios = [c / r for c, r in zip(seconds["cpu"], seconds["reference"])]
    mem = [c / r for c in memory["cpu"] for r in memory["reference"]]
    print(
        f"{name}: dense masked {[round(s, 1) for s in seconds['reference']]} s, "
        f"{[m >> 20 for m in memory['reference']]} MiB; library "
        f"{[round(s, 1) for s in seconds['cpu']]} s, {[m >> 20 for m in memory['cpu']]} MiB; "
        f"time ratio {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}), "
        f"memory ratio {statistics.median(mem):.2f} ({min(mem):.2f}-{max(mem):.2f})",
        flush=True,
    )


if __name__ == "__main__":
    alternating(sys.argv[1], *(int(a) for a in sys.argv[2:4]))

"""One segmentation fine-tuning step (forward with deep supervision, Dice + CE on every
output, backward) of the six-stage STU-Net: the library (fused loss, fused norm +
activation, recomputation) against plain STU-Net (PyTorch autograd, the plain modules,
no fusion, no recomputation, and the reference loss: softmax + one-hot + Dice + CE).

Not timed: the optimizer step (the same AdamW for both). Memory: the peak beyond the
model and the batch (the parameter gradients included, the same for both).
``recompute``: which stages / levels the library recomputes in backward (True: all;
an int n: the n highest resolutions), so that each size shows what the option trades.

Standalone, for the trade-off between the options at one size::

    python -m benchmarks.bench_finetune_step B 128 2 14 [RECOMPUTE ...]

(RECOMPUTE: the choices to compare, ``False``, ``True`` or a number of levels; default
all of them.)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import torch

import anatomask_fast
from anatomask_fast.models.segmentation import STUNet

from .common import benchmark_test, peak_extra_memory, sizes, training_step_pairs

SIZES = sizes(
    full={
        "B-B2-1x64x64x64-4cls": dict(model="B", B=2, spatial=(64, 64, 64), classes=4),
        "B-B2-1x128x128x128-14cls": dict(model="B", B=2, spatial=(128, 128, 128), classes=14),
    },
    # 64^3 at least: six stages of stride 2 leave 32^3 a 1-voxel bottleneck, where the
    # plain network's InstanceNorm refuses to train.
    quick={
        "quick-tiny-B2-1x64x64x64-4cls": dict(model="tiny", B=2, spatial=(64, 64, 64), classes=4)
    },
)


def setup_finetune_step(backend: str, size: dict, device: str):
    torch.manual_seed(0)
    plain = backend == "reference"
    model = STUNet(
        size["model"],
        1,
        size["classes"],
        fused=not plain,
        checkpointing=False if plain else size.get("recompute", True),
    ).to(device)
    x = torch.randn(size["B"], 1, *size["spatial"], device=device)
    labels = torch.randint(0, size["classes"], (size["B"], 1, *size["spatial"]), device=device)

    def run() -> None:
        with anatomask_fast.use_backend(backend):  # reference: the plain one-hot loss
            loss = anatomask_fast.deep_supervision_loss(model(x), labels)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return run


test_finetune_step = benchmark_test(
    "bench_finetune_step", "finetune_step", "finetune step", SIZES, training_step_pairs()
)


def trade_off(
    model: str,
    side: int,
    batch: int,
    classes: int,
    repeats: int = 2,
    choices: Sequence[bool | int] = (False, 1, 2, 3, True),
) -> None:
    """Memory (fresh processes) and time (one process, alternating) of the plain step and
    of the library's with each recomputation choice, as ratios to the plain one."""
    base = dict(model=model, B=batch, spatial=(side,) * 3, classes=classes)
    options = {"plain": ("reference", base)}
    for recompute in choices:
        options[f"fused, recompute={recompute}"] = ("cpu", {**base, "recompute": recompute})
    memory = {
        name: peak_extra_memory("bench_finetune_step", "finetune_step", backend, size, "cpu")
        for name, (backend, size) in options.items()
    }
    runs = {
        name: setup_finetune_step(backend, size, "cpu") for name, (backend, size) in options.items()
    }
    seconds = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - started)
    for name in runs:
        print(
            f"{name:>24}: memory {memory[name] / 2**20:8.0f} MiB "
            f"({memory[name] / memory['plain']:.2f}), time {min(seconds[name]):7.2f} s "
            f"({min(seconds[name]) / min(seconds['plain']):.2f})",
            flush=True,
        )


if __name__ == "__main__":
    picked = [
        {"False": False, "True": True}.get(a) if a in ("False", "True") else int(a)
        for a in sys.argv[5:]
    ]
    trade_off(
        sys.argv[1],
        int(sys.argv[2]),
        int(sys.argv[3]),
        int(sys.argv[4]),
        choices=picked or (False, 1, 2, 3, True),
    )

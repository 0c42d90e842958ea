"""One AnatoMask pretraining step (teacher pass, mask selection, student forward and
backward) of the library against the reference-faithful execution of the same network
(dense-masked encoder, full densify, plain decoder, patchify loss, host-loop masks).
On a GPU also the published configuration, STU-Net-B at 1x112x112x128, B=4, in fp32 and
under bf16 autocast, and STU-Net-L under bf16 autocast.

Not timed: the optimizer step and the EMA update (``bench_pretrain_phases`` times them:
the library's fused AdamW and foreach EMA against the published per-tensor ones).
Memory: the peak beyond the models and the input batch (the parameter gradients
included)."""

from __future__ import annotations

import contextlib
import copy

import torch

from anatomask_fast.models.anatomask import AnatoMaskNet, reference_execution
from anatomask_fast.train.pretrain import pretrain_step
from anatomask_fast.train.step import autocast

from .common import benchmark_test, sizes, training_step_pairs

SIZES = sizes(
    full={
        "tiny-B2-1x64x64x64": dict(model="tiny", B=2, spatial=(64, 64, 64)),
        "B-B2-1x64x64x64": dict(model="B", B=2, spatial=(64, 64, 64)),
    },
    quick={"quick-tiny-B2-1x32x32x32": dict(model="tiny", B=2, spatial=(32, 32, 32))},
    gpu={
        "B-B4-1x112x112x128-fp32": dict(model="B", B=4, spatial=(112, 112, 128)),
        "B-B4-1x112x112x128-bf16": dict(model="B", B=4, spatial=(112, 112, 128), amp="bf16"),
        # Does STU-Net-L pretraining fit a 24 GB card at the published crop and batch?
        "L-B4-1x112x112x128-bf16": dict(model="L", B=4, spatial=(112, 112, 128), amp="bf16"),
    },
)


def setup_pretrain_step(backend: str, size: dict, device: str):
    torch.manual_seed(0)
    student = AnatoMaskNet(size["model"], 1).to(device)
    return step_runner(student, size, backend, device, mask_ratio=0.6, hard_frac=0.25)


def step_runner(
    student,
    size: dict,
    backend: str,
    device: str,
    *,
    mask_ratio: float,
    hard_frac: float | None,
):
    """One pretraining step's forward and backward (the reference-faithful execution for
    the "reference" backend), the gradients dropped after it: ``student`` without the
    parameters the lean execution leaves unused, its frozen copy as the teacher, a random
    batch of ``size`` (B, spatial; amp)."""
    for unused in student.unused_in_lean_mode():
        unused.requires_grad_(False)
    teacher = copy.deepcopy(student).requires_grad_(False)
    x = torch.randn(size["B"], 1, *size["spatial"], device=device)
    amp = size.get("amp", "none")

    def execution():
        return (
            reference_execution(student, teacher)
            if backend == "reference"
            else contextlib.nullcontext()
        )

    def run() -> None:
        with execution(), autocast(torch.device(device), amp):
            loss = pretrain_step(
                student,
                teacher,
                x,
                mask_ratio=mask_ratio,
                hard_frac=hard_frac,
                seed=1,
                teacher_target="raw",
            ).loss
            loss.backward()
        student.zero_grad(set_to_none=True)

    return run


test_pretrain_step = benchmark_test(
    "bench_pretrain_step", "pretrain_step", "pretrain step", SIZES, training_step_pairs()
)

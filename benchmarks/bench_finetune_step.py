"""One segmentation fine-tuning step (forward with deep supervision, Dice + CE on every
output, backward) of STU-Net: the library (fused loss, fused norm + activation,
checkpointing per stage) against a plain nnU-Net-style implementation (the plain
STU-Net modules and the reference loss: softmax + one-hot + Dice + CE).

Not timed: the optimizer step (the same AdamW for both). Memory: the peak beyond the
model and the batch (the parameter gradients included, the same for both)."""
from __future__ import annotations

import torch

import anatomask_fast
from anatomask_fast.models.segmentation import STUNet

from .common import benchmark_test, sizes, training_step_pairs

SIZES = sizes(
    full={"B-B2-1x64x64x64-4cls": dict(model="B", B=2, spatial=(64, 64, 64), classes=4)},
    quick={"quick-tiny-B2-1x32x32x32-4cls": dict(model="tiny", B=2, spatial=(32, 32, 32),
                                                 classes=4)},
    gpu={"B-B2-1x128x128x128-14cls": dict(model="B", B=2, spatial=(128, 128, 128), classes=14)},
)


def setup_finetune_step(backend: str, size: dict, device: str):
    torch.manual_seed(0)
    plain = backend == "reference"
    model = STUNet(size["model"], 1, size["classes"], fused=not plain,
                   checkpointing=not plain).to(device)
    x = torch.randn(size["B"], 1, *size["spatial"], device=device)
    labels = torch.randint(0, size["classes"], (size["B"], 1, *size["spatial"]), device=device)

    def run() -> None:
        with anatomask_fast.use_backend(backend):   # reference: the plain one-hot loss
            loss = anatomask_fast.deep_supervision_loss(model(x), labels)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return run


test_finetune_step = benchmark_test("bench_finetune_step", "finetune_step", "finetune step", SIZES, training_step_pairs())

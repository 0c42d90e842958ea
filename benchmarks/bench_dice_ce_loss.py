"""dice_ce_loss forward+backward: each backend vs the reference (softmax tensor,
one-hot by scatter, products, sums, F.cross_entropy) at nnU-Net patch sizes: 4 classes
at 64^3 (the CPU fine-tuning config) and 14 classes at 128^3 (the GPU config)."""

from __future__ import annotations

import torch

from anatomask_fast import dice_ce_loss, use_backend
from anatomask_fast.ops.seg_loss import DICE_CE_LOSS

from .common import backend_devices, benchmark_test, sizes

SIZES = sizes(
    full={
        "B2-K4-64^3": dict(B=2, K=4, spatial=(64, 64, 64)),
        "B2-K14-128^3": dict(B=2, K=14, spatial=(128, 128, 128)),
    },
    quick={"quick-B2-K4-24^3": dict(B=2, K=4, spatial=(24, 24, 24))},
)


def setup_dice_ce_loss(backend: str, size: dict, device: str):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(size["B"], size["K"], *size["spatial"], generator=gen).to(device)
    logits.requires_grad_()
    labels = torch.randint(0, size["K"], (size["B"], *size["spatial"]), generator=gen).to(device)

    def run() -> None:
        with use_backend(backend):
            dice_ce_loss(logits, labels, batch_dice=True).backward()
        logits.grad = None

    return run


test_dice_ce_loss = benchmark_test(
    "bench_dice_ce_loss",
    "dice_ce_loss",
    "dice_ce_loss fwd+bwd",
    SIZES,
    backend_devices(DICE_CE_LOSS),
)

"""apply_mask forward+backward: each backend vs the reference (repeat_interleave x3,
multiply) at STU-Net stage-0 and stage-2 feature sizes."""

from __future__ import annotations

import torch

from anatomask_fast import apply_mask, use_backend
from anatomask_fast.ops.gather_scatter import APPLY_MASK

from .common import backend_devices, benchmark_test, sizes

SIZES = sizes(
    full={
        "stage0-B4-32x112x112x128": dict(B=4, C=32, spatial=(112, 112, 128), grid=(7, 7, 8)),
        "stage2-B4-128x28x28x32": dict(B=4, C=128, spatial=(28, 28, 32), grid=(7, 7, 8)),
    },
    quick={"quick-B2-8x32x32x32": dict(B=2, C=8, spatial=(32, 32, 32), grid=(4, 4, 4))},
)


def setup_apply_mask(backend: str, size: dict, device: str):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(size["B"], size["C"], *size["spatial"], generator=gen).to(device)
    x.requires_grad_()
    active = (torch.rand(size["B"], 1, *size["grid"], generator=gen) < 0.4).to(device)
    grad = torch.randn(x.shape, generator=gen).to(device)

    def run() -> None:
        with use_backend(backend):
            apply_mask(x, active).backward(grad)
        x.grad = None

    # The bytes that must move: read x, write y; read the gradient, write x's.
    run.bytes_moved = 4 * x.numel() * x.element_size()
    return run


test_apply_mask = benchmark_test(
    "bench_apply_mask", "apply_mask", "apply_mask fwd+bwd", SIZES, backend_devices(APPLY_MASK)
)

"""densify forward+backward: each backend vs the reference (repeat_interleave x3,
torch.where; backward: where + sum) at the apply_mask benchmark's sizes."""

from __future__ import annotations

import torch

from anatomask_fast import densify, use_backend
from anatomask_fast.ops.gather_scatter import DENSIFY

from .bench_apply_mask import SIZES
from .common import backend_devices, benchmark_test


def volume_inputs(size: dict, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x requiring grad, visible mask with 40% kept, incoming gradient)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(size["B"], size["C"], *size["spatial"], generator=gen).to(device)
    active = (torch.rand(size["B"], 1, *size["grid"], generator=gen) < 0.4).to(device)
    grad = torch.randn(x.shape, generator=gen).to(device)
    return x.requires_grad_(), active, grad


def setup_densify(backend: str, size: dict, device: str):
    x, active, grad = volume_inputs(size, device)
    token = torch.randn(1, size["C"], 1, 1, 1, device=device, requires_grad=True)

    def run() -> None:
        with use_backend(backend):
            densify(x, active, token).backward(grad)
        x.grad = token.grad = None

    # The bytes that must move: read x, write y; read the gradient, write x's.
    run.bytes_moved = 4 * x.numel() * x.element_size()
    return run


test_densify = benchmark_test(
    "bench_densify", "densify", "densify fwd+bwd", SIZES, backend_devices(DENSIFY)
)

"""pad_halo_backward alone (the adjoint of pad_halo, for backward passes that rebuild
the halo'd tensor; not differentiable, so forward only): each backend vs the reference,
at the sizes of bench_pack_patches, lo = hi = 1."""

from __future__ import annotations

import torch

from anatomask_fast import pack_patches, pad_halo, pad_halo_backward, use_backend
from anatomask_fast.ops.packing import PAD_HALO_BACKWARD

from .bench_pack_patches import SIZES, packing_inputs
from .common import backend_devices, benchmark_test


def setup_pad_halo_backward(backend: str, size: dict, device: str):
    x, layout = packing_inputs(size, device)
    packed = pack_patches(x.detach(), layout.patches, layout.slots)
    grad = torch.randn_like(pad_halo(packed, layout.neighbours, 1, 1))

    def run() -> None:
        with use_backend(backend):
            pad_halo_backward(grad, layout.neighbours, 1, 1)

    return run


test_pad_halo_backward = benchmark_test(
    "bench_pad_halo_backward",
    "pad_halo_backward",
    "pad_halo_backward fwd",
    SIZES,
    backend_devices(PAD_HALO_BACKWARD),
)

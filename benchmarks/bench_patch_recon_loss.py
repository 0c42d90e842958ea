"""patch_recon_loss forward+backward (student loss, norm_pix): each backend vs the
reference (patchify copies, normalized target, squared error) at the pretraining size
and at B=2, 1x160x160x160, patch 16.

The issue's memory target counts what a step needs beyond its inputs and the
gradient it returns, so the setup touches and frees a gradient-sized buffer: on CPU
the fresh-process baseline peak (VmHWM) then already holds one gradient, for the
reference and the kernels alike. ``gradient_bytes`` in extra_info says how much.
"""

from __future__ import annotations

import torch

from anatomask_fast import patch_recon_loss, use_backend
from anatomask_fast.ops.patch_loss import PATCH_RECON_LOSS

from .common import backend_devices, benchmark_test, sizes

SIZES = sizes(
    full={
        "pretrain-B4-1x112x112x128-p16": dict(B=4, C=1, spatial=(112, 112, 128), patch=16),
        "B2-1x160x160x160-p16": dict(B=2, C=1, spatial=(160, 160, 160), patch=16),
    },
    quick={"quick-B2-1x32x32x32-p8": dict(B=2, C=1, spatial=(32, 32, 32), patch=8)},
)


def setup_patch_recon_loss(backend: str, size: dict, device: str):
    gen = torch.Generator().manual_seed(0)
    shape = (size["B"], size["C"], *size["spatial"])
    x = torch.randn(shape, generator=gen).to(device)
    rec = torch.randn(shape, generator=gen).to(device).requires_grad_()
    grid = tuple(s // size["patch"] for s in size["spatial"])
    active = (torch.rand(size["B"], 1, *grid, generator=gen) < 0.4).to(device)
    torch.ones_like(rec)  # the gradient's share of the baseline peak (see above)

    def run() -> None:
        with use_backend(backend):
            loss, _ = patch_recon_loss(rec, x, active, size["patch"])
        loss.backward()
        rec.grad = None

    # The bytes that must move: read rec and x; read them again with the gradient, write rec's.
    run.bytes_moved = 5 * rec.numel() * rec.element_size()
    return run


test_patch_recon_loss = benchmark_test(
    "bench_patch_recon_loss",
    "patch_recon_loss",
    "patch_recon_loss fwd+bwd",
    SIZES,
    backend_devices(PATCH_RECON_LOSS),
)

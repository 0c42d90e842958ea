"""gather_tokens forward+backward: each backend vs MAE's torch.gather. Tokens are the
patches of the apply_mask benchmark's volumes: L = h*w*d, C = channels * patch volume,
40% kept."""

from __future__ import annotations

import math

import torch

from anatomask_fast import gather_tokens, use_backend
from anatomask_fast.ops.gather_scatter import GATHER_TOKENS

from .bench_apply_mask import SIZES
from .common import backend_devices, benchmark_test


def token_inputs(size: dict, device: str):
    """(B, L, C, len_keep, ids_keep, ids_restore, generator)."""
    gen = torch.Generator().manual_seed(0)
    B, L = size["B"], math.prod(size["grid"])
    C = size["C"] * math.prod(size["spatial"]) // L
    keep = round(L * 0.4)
    ids_shuffle = torch.rand(B, L, generator=gen).argsort(dim=1)
    return (
        B,
        L,
        C,
        keep,
        ids_shuffle[:, :keep].to(device),
        ids_shuffle.argsort(dim=1).to(device),
        gen,
    )


def setup_gather_tokens(backend: str, size: dict, device: str):
    B, L, C, keep, ids_keep, _, gen = token_inputs(size, device)
    x = torch.randn(B, L, C, generator=gen).to(device).requires_grad_()
    grad = torch.randn(B, keep, C, generator=gen).to(device)

    def run() -> None:
        with use_backend(backend):
            gather_tokens(x, ids_keep).backward(grad)
        x.grad = None

    # The bytes that must move: read the kept rows, write them; read their gradient,
    # write the (B, L, C) gradient of x.
    run.bytes_moved = (3 * grad.numel() + x.numel()) * x.element_size()
    return run


test_gather_tokens = benchmark_test(
    "bench_gather_tokens",
    "gather_tokens",
    "gather_tokens fwd+bwd",
    SIZES,
    backend_devices(GATHER_TOKENS),
)

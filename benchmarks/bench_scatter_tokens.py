"""scatter_tokens forward+backward with a positional embedding: each backend vs MAE's
way (repeat the mask token, cat, torch.gather, add pos_embed), tokens as in
bench_gather_tokens."""

from __future__ import annotations

import torch

from anatomask_fast import scatter_tokens, use_backend
from anatomask_fast.ops.gather_scatter import SCATTER_TOKENS

from .bench_apply_mask import SIZES
from .bench_gather_tokens import token_inputs
from .common import backend_devices, benchmark_test


def setup_scatter_tokens(backend: str, size: dict, device: str):
    B, L, C, keep, _, ids_restore, gen = token_inputs(size, device)
    x = torch.randn(B, keep, C, generator=gen).to(device).requires_grad_()
    token = torch.randn(1, 1, C, generator=gen).to(device).requires_grad_()
    pos = torch.randn(1, L, C, generator=gen).to(device).requires_grad_()
    grad = torch.randn(B, L, C, generator=gen).to(device)

    def run() -> None:
        with use_backend(backend):
            scatter_tokens(x, ids_restore, token, pos).backward(grad)
        x.grad = token.grad = pos.grad = None

    # The bytes that must move: write the (B, L, C) output; read its gradient, write pos_embed's.
    run.bytes_moved = 3 * grad.numel() * grad.element_size()
    return run


test_scatter_tokens = benchmark_test(
    "bench_scatter_tokens",
    "scatter_tokens",
    "scatter_tokens fwd+bwd",
    SIZES,
    backend_devices(SCATTER_TOKENS),
)

"""sparse_norm forward+backward (affine, LeakyReLU, pooled and per-sample statistics):
each backend vs the reference (boolean-index gather, instance_norm, zeros, scatter)."""

from __future__ import annotations

import pytest
import torch

from anatomask_fast import sparse_norm, use_backend
from anatomask_fast.ops.gather_scatter import SPARSE_NORM

from .bench_apply_mask import SIZES
from .bench_densify import volume_inputs
from .common import backend_devices, benchmark_test


def setup_sparse_norm(backend: str, size: dict, device: str):
    x, active, grad = volume_inputs(size, device)
    weight = torch.randn(size["C"], device=device, requires_grad=True)
    bias = torch.randn(size["C"], device=device, requires_grad=True)

    def run() -> None:
        with use_backend(backend):
            sparse_norm(
                x, active, weight, bias, per_sample=size["per_sample"], activation="leaky_relu"
            ).backward(grad)
        x.grad = weight.grad = bias.grad = None

    # The bytes that must move: read x, write y; read the gradient and x, write x's.
    run.bytes_moved = 5 * x.numel() * x.element_size()
    return run


# Both statistics modes at every size: pooled (the reference's quirk) and per-sample.
MODES = [
    pytest.param(
        {
            **param.values[0],
            "per_sample": per_sample,
            "name": f"{'per-sample' if per_sample else 'pooled'} {param.values[0]['name']}",
        },
        id=f"{'per-sample' if per_sample else 'pooled'}-{param.id}",
    )
    for param in SIZES
    for per_sample in (False, True)
]

test_sparse_norm = benchmark_test(
    "bench_sparse_norm", "sparse_norm", "sparse_norm fwd+bwd", MODES, backend_devices(SPARSE_NORM)
)

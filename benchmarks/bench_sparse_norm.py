"""sparse_norm forward+backward (affine, LeakyReLU, pooled and per-sample statistics):
each backend vs the reference (boolean-index gather, instance_norm, zeros, scatter)."""
from __future__ import annotations

import pytest
import torch

from anatomask_fast import sparse_norm, use_backend
from anatomask_fast.ops.gather_scatter import SPARSE_NORM

from .bench_apply_mask import SIZES
from .bench_densify import volume_inputs
from .common import backend_devices, record


def setup_sparse_norm(backend: str, size: dict, device: str):
    x, active, grad = volume_inputs(size, device)
    weight = torch.randn(size["C"], device=device, requires_grad=True)
    bias = torch.randn(size["C"], device=device, requires_grad=True)

    def run() -> None:
        with use_backend(backend):
            sparse_norm(x, active, weight, bias, per_sample=size["per_sample"],
                        activation="leaky_relu").backward(grad)
        x.grad = weight.grad = bias.grad = None

    return run


@pytest.mark.parametrize("per_sample", [False, True], ids=["pooled", "per-sample"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("backend,device", backend_devices(SPARSE_NORM))
def test_sparse_norm(benchmark, backend, device, size, per_sample):
    size = {**size, "per_sample": per_sample}
    benchmark.group = f"sparse_norm {'per-sample' if per_sample else 'pooled'} fwd+bwd {size['name']}"
    record(benchmark, module="bench_sparse_norm", case="sparse_norm", backend=backend, size=size,
           device=device, run=setup_sparse_norm(backend, size, device))

"""The sparse STU-Net encoder forward+backward: packed execution (stages chosen by
cost) vs the dense-masked reference execution (SparK-style: dense convs, masked
outputs, reference sparse norms), at STU-Net-B widths, 1x64x64x64, B=2, mask ratios
0.6 and 0.75. Backends: "reference" is the dense-masked execution on the reference
ops (its sparse norm included); "cpu"/"cuda" the packed execution with the compiled
kernels.

Peak memory is the fresh-process RSS: glibc's dynamic mmap threshold serves tensors
up to 32 MiB from the heap after the first such free, and heap holes stay resident, so
it varies by ~15% between identical runs. ``MALLOC_MMAP_THRESHOLD_=131072`` in the
environment fixes the threshold: the RSS then follows the live tensor bytes."""

from __future__ import annotations

import pytest
import torch

from anatomask_fast import use_backend
from anatomask_fast.models import SparseSTUNetEncoder, STUNetEncoder

from .common import record, sizes, skip_other_device

SIZES = sizes(
    full={
        "B-B2-1x64x64x64-r0.6": dict(size="B", B=2, spatial=(64, 64, 64), ratio=0.6),
        "B-B2-1x64x64x64-r0.75": dict(size="B", B=2, spatial=(64, 64, 64), ratio=0.75),
    },
    quick={"tiny-B2-1x32x32x32-r0.6": dict(size="tiny", B=2, spatial=(32, 32, 32), ratio=0.6)},
    gpu={"B-B4-1x112x112x128-r0.6": dict(size="B", B=4, spatial=(112, 112, 128), ratio=0.6)},
)


def _pairs() -> list:
    pairs = [("reference", "cpu"), ("cpu", "cpu")]
    if torch.cuda.is_available():
        pairs += [("reference", "cuda"), ("cuda", "cuda")]
    return [pytest.param(b, d, id=f"{b}-{d}") for b, d in pairs]


def setup_sparse_encoder(backend: str, size: dict, device: str):
    torch.manual_seed(0)
    encoder = STUNetEncoder.from_size(size["size"]).to(device)
    sparse = SparseSTUNetEncoder(encoder, packed_stages=0 if backend == "reference" else None)
    x = torch.randn(size["B"], 1, *size["spatial"], device=device)
    grid = tuple(s // 16 for s in size["spatial"])
    cells = grid[0] * grid[1] * grid[2]
    keep = round(cells * (1 - size["ratio"]))
    order = torch.rand(size["B"], cells).argsort(dim=1)
    active = (order < keep).view(size["B"], 1, *grid).to(device)

    def run() -> None:
        with use_backend(backend):
            features = sparse(x, active)
            sum(f.mean() for f in features).backward()
        encoder.zero_grad(set_to_none=True)

    return run


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("backend,device", _pairs())
def test_sparse_encoder(benchmark, backend, device, size):
    skip_other_device(size, device)
    benchmark.group = f"sparse STU-Net encoder fwd+bwd {size['name']}"
    record(
        benchmark,
        module="bench_sparse_encoder",
        case="sparse_encoder",
        backend=backend,
        size=size,
        device=device,
        run=setup_sparse_encoder(backend, size, device),
    )

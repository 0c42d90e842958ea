"""anatomical_mask (forward only: the mask is not differentiable): each backend vs the
reference's per-sample host loop, at the paper's grid (7x7x8 = 392 patches) and at
L = 4096, batch 8, mask ratio 0.6, hard_frac 0.5 (the end of the easy-to-hard
schedule), randomness drawn from a seed (no noise tensor)."""

from __future__ import annotations

import torch

from anatomask_fast import anatomical_mask, use_backend
from anatomask_fast.ops.mask_select import ANATOMICAL_MASK

from .common import backend_devices, benchmark_test, sizes

SIZES = sizes(
    full={"B8-L392": dict(B=8, grid=(7, 7, 8)), "B8-L4096": dict(B=8, grid=(16, 16, 16))},
    quick={"quick-B2-L64": dict(B=2, grid=(4, 4, 4))},
)


def setup_anatomical_mask(backend: str, size: dict, device: str):
    gen = torch.Generator().manual_seed(0)
    errors = torch.rand(size["B"], 1, *size["grid"], generator=gen).to(device)

    def run() -> None:
        with use_backend(backend):
            anatomical_mask(errors, mask_ratio=0.6, hard_frac=0.5)

    return run


test_anatomical_mask = benchmark_test(
    "bench_anatomical_mask",
    "anatomical_mask",
    "anatomical_mask",
    SIZES,
    backend_devices(ANATOMICAL_MASK),
)


def setup_anatomical_mask_graph(backend: str, size: dict, device: str):
    """One replay of a CUDA graph holding the selection: the device time without Python
    and launch overhead. Capture itself fails if the op synchronizes with the host."""
    errors = torch.rand(size["B"], 1, *size["grid"], device=device)
    with use_backend(backend):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile and warm up outside capture
            anatomical_mask(errors, mask_ratio=0.6, hard_frac=0.5, seed=1)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            anatomical_mask(errors, mask_ratio=0.6, hard_frac=0.5, seed=1)
    return graph.replay


def _graph_pairs() -> list:
    return [
        p
        for p in backend_devices(ANATOMICAL_MASK)
        if p.values[1] == "cuda" and p.values[0] != "reference"
    ]


test_anatomical_mask_graph = benchmark_test(
    "bench_anatomical_mask",
    "anatomical_mask_graph",
    "anatomical_mask CUDA graph replay",
    SIZES,
    _graph_pairs(),
)

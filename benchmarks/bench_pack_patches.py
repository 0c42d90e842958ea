"""pack_patches as a packed convolution uses it, forward+backward: each backend vs the
reference, at STU-Net-B stage-0 and stage-1 sizes (1x64x64x64, B=2, mask ratio 0.6):
pack the visible patches, add the halo a 3x3x3 conv needs, unpack (the other packing
ops alone: bench_unpack_patches, bench_pad_halo, bench_pad_halo_backward)."""

from __future__ import annotations

import torch

from anatomask_fast import pack_patches, pad_halo, unpack_patches, use_backend
from anatomask_fast.models import MaskLayout
from anatomask_fast.ops.packing import PAD_HALO

from .common import backend_devices, benchmark_test, sizes

SIZES = sizes(
    full={
        "stage0-B2-32x64x64x64": dict(B=2, C=32, spatial=(64, 64, 64), grid=(4, 4, 4)),
        "stage1-B2-64x32x32x32": dict(B=2, C=64, spatial=(32, 32, 32), grid=(4, 4, 4)),
    },
    quick={"quick-B2-8x32x32x32": dict(B=2, C=8, spatial=(32, 32, 32), grid=(2, 2, 2))},
)


def packing_inputs(size: dict, device: str):
    """(x, layout) of a size: x requires grad, 40% of the patches visible."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(size["B"], size["C"], *size["spatial"], generator=gen).to(device)
    x.requires_grad_()
    active = (torch.rand(size["B"], 1, *size["grid"], generator=gen) < 0.4).to(device)
    return x, MaskLayout.build(active)


def setup_pack_patches(backend: str, size: dict, device: str):
    x, layout = packing_inputs(size, device)

    def run() -> None:
        with use_backend(backend):
            packed = pack_patches(x, layout.patches, layout.slots)
            halo = pad_halo(packed, layout.neighbours, 1, 1)
            dense = unpack_patches(halo[:, :, 1:-1, 1:-1, 1:-1], layout.patches, layout.slots)
            (halo.sum() + dense.sum()).backward()
        x.grad = None

    return run


test_pack_patches = benchmark_test(
    "bench_pack_patches",
    "pack_patches",
    "pack+pad_halo+unpack fwd+bwd",
    SIZES,
    backend_devices(PAD_HALO),
)

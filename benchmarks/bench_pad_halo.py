"""pad_halo forward+backward alone (its backward is pad_halo_backward, the gather-add
adjoint): each backend vs the reference, at the sizes of bench_pack_patches, with the
halo of a stride-1 3x3x3 convolution (lo = hi = 1)."""

from __future__ import annotations

from anatomask_fast import pack_patches, pad_halo, use_backend
from anatomask_fast.ops.packing import PAD_HALO

from .bench_pack_patches import SIZES, packing_inputs
from .common import backend_devices, benchmark_test


def setup_pad_halo(backend: str, size: dict, device: str):
    x, layout = packing_inputs(size, device)
    packed = pack_patches(x.detach(), layout.patches, layout.slots).requires_grad_()

    def run() -> None:
        with use_backend(backend):
            pad_halo(packed, layout.neighbours, 1, 1).sum().backward()
        packed.grad = None

    return run


test_pad_halo = benchmark_test(
    "bench_pad_halo", "pad_halo", "pad_halo fwd+bwd", SIZES, backend_devices(PAD_HALO)
)

"""unpack_patches forward+backward alone (its backward is pack_patches): each backend
vs the reference, at the sizes of bench_pack_patches."""

from __future__ import annotations

from anatomask_fast import pack_patches, unpack_patches, use_backend
from anatomask_fast.ops.packing import UNPACK_PATCHES

from .bench_pack_patches import SIZES, packing_inputs
from .common import backend_devices, benchmark_test


def setup_unpack_patches(backend: str, size: dict, device: str):
    x, layout = packing_inputs(size, device)
    packed = pack_patches(x.detach(), layout.patches, layout.slots).requires_grad_()

    def run() -> None:
        with use_backend(backend):
            unpack_patches(packed, layout.patches, layout.slots).sum().backward()
        packed.grad = None

    # Read the packed patches and write the map (zeros at hidden cells); backward reads
    # the map's gradient at visible cells and writes the packed gradient.
    run.bytes_moved = (3 * packed.numel() + x.numel()) * x.element_size()
    return run


test_unpack_patches = benchmark_test(
    "bench_unpack_patches",
    "unpack_patches",
    "unpack_patches fwd+bwd",
    SIZES,
    backend_devices(UNPACK_PATCHES),
)

"""pad_halo_backward (the adjoint of pad_halo, a deterministic gather-add) on every
backend against the reference's autograd adjoint, and its own backward (pad_halo)."""

import pytest
import torch

from anatomask_fast import use_backend
from anatomask_fast.ops.packing import pack_patches, pad_halo, pad_halo_backward
from anatomask_fast.reference import pack_patches_reference, pad_halo_reference

from .conftest import BACKEND_DEVICES, OPCHECK_BACKENDS
from .helpers import TOLERANCES, opcheck
from .packing_cases import DTYPES, HALOS, SHAPES, bad_layout_call, case, layout_on, packed_case


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lo,hi", HALOS)
@pytest.mark.parametrize("batch,channels,grid,side", SHAPES)
def test_matches_reference(backend, device, dtype, lo, hi, batch, channels, grid, side):
    layout, x, gen = case(batch, channels, grid, side, dtype, device, 7 * lo + hi + batch)
    patches, slots, neighbours = layout_on(device, layout)
    packed = pack_patches_reference(x, patches, slots).requires_grad_()
    halo = pad_halo_reference(packed, neighbours, lo, hi)
    grad = torch.randn(halo.shape, generator=gen).to(device, dtype)
    halo.backward(grad)
    with use_backend(backend):
        adjoint = pad_halo_backward(grad, neighbours, lo, hi)
    # Sums of up to 8 values in fp32: one rounding of the stored dtype.
    torch.testing.assert_close(adjoint, packed.grad, **TOLERANCES[dtype])


def test_gradcheck_cpp_kernels():
    """Its own backward is pad_halo (the adjoint of the adjoint)."""
    layout, packed = packed_case(torch.float64, 3)
    halo = torch.randn(
        pad_halo(packed, layout.neighbours, 1, 0).shape, dtype=torch.float64, requires_grad=True
    )
    with use_backend("cpu"):
        assert torch.autograd.gradcheck(
            lambda g: pad_halo_backward(g, layout.neighbours, 1, 0), (halo,)
        )


@pytest.mark.parametrize("backend,device", OPCHECK_BACKENDS)
def test_opcheck(backend, device):
    layout, _, _ = case(2, 3, (2, 3, 2), (2, 2, 3), torch.float32, "cpu", 5)
    halo = torch.randn(layout.patches.shape[0], 3, 4, 4, 5, requires_grad=True)
    opcheck("pad_halo_backward", backend, device, halo, layout.neighbours, 1, 1)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (
            lambda x, lay: pad_halo_backward(
                pack_patches(x, lay.patches, lay.slots), lay.neighbours, 2, 1
            ),
            ValueError,
            r"pad_halo_backward: argument 'lo' must "
            r"be an int in \[0, 1\].*got 2",
        ),
    ],
)
def test_bad_input_names_the_argument(call, error, match):
    bad_layout_call(call, error, match)

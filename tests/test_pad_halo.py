"""pad_halo on every backend against the reference, forward and backward (its
backward is the gather-add adjoint, pad_halo_backward), and a padding-0 convolution on
the halo'd patches equal to the dense masked convolution."""

import pytest
import torch
import torch.nn.functional as F

import anatomask_fast
from anatomask_fast import use_backend
from anatomask_fast.models import MaskLayout
from anatomask_fast.ops.packing import pack_patches, pad_halo, unpack_patches
from anatomask_fast.reference import (
    apply_mask_reference,
    pack_patches_reference,
    pad_halo_reference,
)

from .conftest import BACKEND_DEVICES, OPCHECK_BACKENDS
from .helpers import TOLERANCES, opcheck, random_mask
from .packing_cases import DTYPES, HALOS, SHAPES, bad_layout_call, case, layout_on, packed_case


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lo,hi", HALOS)
@pytest.mark.parametrize("batch,channels,grid,side", SHAPES)
def test_matches_reference(backend, device, dtype, lo, hi, batch, channels, grid, side):
    layout, x, gen = case(batch, channels, grid, side, dtype, device, 7 * lo + hi + batch)
    patches, slots, neighbours = layout_on(device, layout)
    packed = pack_patches_reference(x, patches, slots)
    p_ref, p_test = packed.clone().requires_grad_(), packed.clone().requires_grad_()
    expected = pad_halo_reference(p_ref, neighbours, lo, hi)
    grad = torch.randn(expected.shape, generator=gen).to(device, dtype)
    expected.backward(grad)
    with use_backend(backend):
        out = pad_halo(p_test, neighbours, lo, hi)
    out.backward(grad)
    assert torch.equal(out, expected)
    # The adjoint sums up to 8 values in fp32: one rounding of the stored dtype.
    torch.testing.assert_close(p_test.grad, p_ref.grad, **TOLERANCES[dtype])


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("stride,lo,hi", [(1, 1, 1), (2, 1, 0)])
def test_conv_on_halo_equals_dense_masked_conv(backend, device, stride, lo, hi):
    """A padding-0 conv on the halo'd visible patches gives the dense conv (padding 1)
    of the masked map at visible positions: the halo holds exactly the neighbours'
    voxels the 3x3x3 kernel reads, zeros where they are hidden or outside."""
    gen = torch.Generator().manual_seed(stride)
    active = random_mask(2, (3, 2, 3), keep=0.5, generator=gen)
    layout = MaskLayout.build(active)
    patches, slots, neighbours = layout_on(device, layout)
    x = apply_mask_reference(torch.randn(2, 3, 12, 8, 12, generator=gen), active).to(device)
    weight = torch.randn(4, 3, 3, 3, 3, generator=gen).to(device)
    coarse = MaskLayout.build(active)
    dense = apply_mask_reference(F.conv3d(x, weight, stride=stride, padding=1), active.to(device))
    with use_backend(backend):
        packed = pad_halo(pack_patches(x, patches, slots), neighbours, lo, hi)
        out = unpack_patches(
            F.conv3d(packed, weight, stride=stride),
            coarse.patches.to(device),
            coarse.slots.to(device),
        )
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


def test_gradcheck_cpp_kernels():
    layout, packed = packed_case(torch.float64, 3)
    with use_backend("cpu"):
        assert torch.autograd.gradcheck(lambda p: pad_halo(p, layout.neighbours, 1, 1), (packed,))


@pytest.mark.parametrize("backend,device", OPCHECK_BACKENDS)
def test_opcheck(backend, device):
    layout, packed = packed_case(torch.float32, 5, channels=3, grid=(2, 3, 2), side=(2, 2, 3))
    opcheck("pad_halo", backend, device, packed, layout.neighbours, 1, 0)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (
            lambda x, lay: pad_halo(pack_patches(x, lay.patches, lay.slots), lay.neighbours, 5, 1),
            ValueError,
            r"'lo' must be an int in \[0, 4\].*got 5",
        ),
        (
            lambda x, lay: pad_halo(
                pack_patches(x, lay.patches, lay.slots), lay.neighbours[:, :9], 1, 1
            ),
            ValueError,
            r"'neighbours' must have shape \(\d+, 27\)",
        ),
    ],
)
def test_bad_input_names_the_argument(call, error, match):
    bad_layout_call(call, error, match)


def test_public_exports():
    assert anatomask_fast.pad_halo is pad_halo

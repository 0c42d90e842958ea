"""unpack_patches on every backend against the reference, forward and backward (its
backward is pack_patches: pure data movement, exact for every dtype)."""

import pytest
import torch

from anatomask_fast import use_backend
from anatomask_fast.ops.packing import unpack_patches
from anatomask_fast.reference import (
    apply_mask_reference,
    pack_patches_reference,
    unpack_patches_reference,
)

from .conftest import BACKEND_DEVICES, OPCHECK_BACKENDS
from .helpers import opcheck
from .packing_cases import DTYPES, SHAPES, bad_layout_call, case, layout_on, packed_case


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,channels,grid,side", SHAPES)
def test_matches_reference(backend, device, dtype, batch, channels, grid, side):
    layout, x, gen = case(batch, channels, grid, side, dtype, device, sum(side) + batch)
    patches, slots, _ = layout_on(device, layout)
    packed = pack_patches_reference(x, patches, slots)
    p_ref, p_test = packed.clone().requires_grad_(), packed.clone().requires_grad_()
    with use_backend(backend):
        dense = unpack_patches(p_test, patches, slots)
    # The visible patches back in place, zeros at hidden cells.
    assert torch.equal(dense, apply_mask_reference(x, layout.active.to(device)))
    grad = torch.randn(dense.shape, generator=gen).to(device, dtype)
    dense.backward(grad)
    unpack_patches_reference(p_ref, patches, slots).backward(grad)
    assert torch.equal(p_test.grad, p_ref.grad)


@pytest.mark.parametrize("backend,device", OPCHECK_BACKENDS)
def test_opcheck(backend, device):
    layout, packed = packed_case(torch.float32, 5, channels=3, grid=(2, 3, 2), side=(2, 2, 3))
    opcheck("unpack_patches", backend, device, packed, layout.patches, layout.slots)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (
            lambda x, lay: unpack_patches(x, lay.patches, lay.slots),
            ValueError,
            r"'patches' must have 2 entries",
        ),
    ],
)
def test_bad_input_names_the_argument(call, error, match):
    bad_layout_call(call, error, match)

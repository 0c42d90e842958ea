"""pack_patches on every backend against the reference, forward and backward (its
backward is unpack_patches: pure data movement, exact for every dtype)."""

import pytest
import torch

from anatomask_fast import use_backend
from anatomask_fast.ops.packing import pack_patches, pad_halo, unpack_patches
from anatomask_fast.reference import pack_patches_reference, pad_halo_reference

from .conftest import BACKEND_DEVICES, OPCHECK_BACKENDS
from .helpers import opcheck
from .packing_cases import DTYPES, SHAPES, bad_layout_call, case, layout_on


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,channels,grid,side", SHAPES)
def test_matches_reference(backend, device, dtype, batch, channels, grid, side):
    layout, x, gen = case(batch, channels, grid, side, dtype, device, sum(side) + batch)
    patches, slots, _ = layout_on(device, layout)
    x_ref, x_test = x.clone().requires_grad_(), x.clone().requires_grad_()
    packed_ref = pack_patches_reference(x_ref, patches, slots)
    grad = torch.randn(packed_ref.shape, generator=gen).to(device, dtype)
    packed_ref.backward(grad)
    with use_backend(backend):
        packed = pack_patches(x_test, patches, slots)
        packed.backward(grad)
    assert torch.equal(packed, packed_ref)
    assert torch.equal(x_test.grad, x_ref.grad)


def test_gradcheck_cpp_kernels():
    layout, x, _ = case(2, 2, (2, 2, 1), (2, 3, 2), torch.float64, "cpu", 3)
    with use_backend("cpu"):
        assert torch.autograd.gradcheck(
            lambda t: unpack_patches(
                pack_patches(t, layout.patches, layout.slots) * 2, layout.patches, layout.slots
            ),
            (x.requires_grad_(),),
        )


@pytest.mark.parametrize("backend,device", OPCHECK_BACKENDS)
def test_opcheck(backend, device):
    layout, x, _ = case(2, 3, (2, 3, 2), (2, 2, 3), torch.float32, "cpu", 5)
    opcheck("pack_patches", backend, device, x.requires_grad_(), layout.patches, layout.slots)


def test_torch_compile_fullgraph_on_cpu():
    layout, x, _ = case(2, 2, (2, 2, 2), (2, 2, 2), torch.float32, "cpu", 9)
    x.requires_grad_()

    def step(t):
        packed = pad_halo(
            pack_patches(t * 2.0, layout.patches, layout.slots), layout.neighbours, 1, 1
        )
        return (packed**2).sum()

    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    loss.backward()
    x_ref = x.detach().clone().requires_grad_()
    expected = (
        pad_halo_reference(
            pack_patches_reference(x_ref * 2.0, layout.patches, layout.slots),
            layout.neighbours,
            1,
            1,
        )
        ** 2
    ).sum()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(x.grad, x_ref.grad)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda x, lay: pack_patches(x[0], lay.patches, lay.slots), ValueError, r"'x' must be 5-D"),
        (
            lambda x, lay: pack_patches(x, lay.patches.int(), lay.slots),
            TypeError,
            r"'patches' must have dtype in \(torch.int64\), got torch.int32",
        ),
        (
            lambda x, lay: pack_patches(x, lay.patches, lay.slots[:1]),
            ValueError,
            r"'slots' must have batch 2",
        ),
        (
            lambda x, lay: pack_patches(x[..., :7], lay.patches, lay.slots),
            ValueError,
            r"grid \(2, 2, 2\) of 'slots' must divide the spatial shape \(8, 8, 7\)",
        ),
    ],
)
def test_bad_input_names_the_argument(call, error, match):
    bad_layout_call(call, error, match)

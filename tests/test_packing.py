"""pack_patches, unpack_patches and pad_halo on every backend against the reference,
forward and backward (the backward of pad_halo is the gather-add adjoint)."""
import pytest
import torch
import torch.nn.functional as F

import anatomask_fast
from anatomask_fast import use_backend
from anatomask_fast.models import MaskLayout
from anatomask_fast.ops.packing import pack_patches, pad_halo, pad_halo_backward, unpack_patches
from anatomask_fast.reference import (apply_mask_reference, pack_patches_reference,
                                      pad_halo_reference, unpack_patches_reference)

from .conftest import BACKEND_DEVICES
from .helpers import TOLERANCES, random_mask

# (B, C, grid, patch side): odd grids, anisotropic patches, single-voxel patches, B=1.
SHAPES = [
    (2, 3, (3, 2, 4), (4, 4, 4)),
    (1, 2, (2, 3, 1), (3, 2, 5)),
    (3, 1, (2, 2, 2), (1, 1, 1)),
    (2, 5, (1, 4, 3), (2, 6, 2)),
]
HALOS = [(1, 1), (1, 0), (0, 1), (0, 0)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _case(batch, channels, grid, side, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    active = random_mask(batch, grid, keep=0.6, generator=gen)
    layout = MaskLayout.build(active)
    spatial = tuple(g * s for g, s in zip(grid, side))
    x = torch.randn(batch, channels, *spatial, generator=gen).to(device, dtype)
    return layout, x, gen


def _on(device, layout):
    return layout.patches.to(device), layout.slots.to(device), layout.neighbours.to(device)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,channels,grid,side", SHAPES)
def test_pack_and_unpack_match_reference(backend, device, dtype, batch, channels, grid, side):
    layout, x, gen = _case(batch, channels, grid, side, dtype, device, sum(side) + batch)
    patches, slots, _ = _on(device, layout)
    x_ref, x_test = x.clone().requires_grad_(), x.clone().requires_grad_()
    packed_ref = pack_patches_reference(x_ref, patches, slots)
    grad = torch.randn(packed_ref.shape, generator=gen).to(device, dtype)
    packed_ref.backward(grad)
    with use_backend(backend):
        packed = pack_patches(x_test, patches, slots)
        packed.backward(grad)
        p_test = packed.detach().clone().requires_grad_()
        dense = unpack_patches(p_test, patches, slots)
    # Pure data movement: exact for every dtype.
    assert torch.equal(packed, packed_ref)
    assert torch.equal(x_test.grad, x_ref.grad)
    assert torch.equal(dense, apply_mask_reference(x, layout.active.to(device)))
    grad_dense = torch.randn(dense.shape, generator=gen).to(device, dtype)
    dense.backward(grad_dense)
    p_ref = packed_ref.detach().clone().requires_grad_()
    unpack_patches_reference(p_ref, patches, slots).backward(grad_dense)
    assert torch.equal(p_test.grad, p_ref.grad)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lo,hi", HALOS)
@pytest.mark.parametrize("batch,channels,grid,side", SHAPES)
def test_pad_halo_matches_reference(backend, device, dtype, lo, hi, batch, channels, grid, side):
    layout, x, gen = _case(batch, channels, grid, side, dtype, device, 7 * lo + hi + batch)
    patches, slots, neighbours = _on(device, layout)
    packed = pack_patches_reference(x, patches, slots)
    p_ref, p_test = packed.clone().requires_grad_(), packed.clone().requires_grad_()
    expected = pad_halo_reference(p_ref, neighbours, lo, hi)
    grad = torch.randn(expected.shape, generator=gen).to(device, dtype)
    expected.backward(grad)
    with use_backend(backend):
        out = pad_halo(p_test, neighbours, lo, hi)
        adjoint = pad_halo_backward(grad, neighbours, lo, hi)
    out.backward(grad)
    assert torch.equal(out, expected)
    # The adjoint sums up to 8 values in fp32: one rounding of the stored dtype.
    torch.testing.assert_close(p_test.grad, p_ref.grad, **TOLERANCES[dtype])
    torch.testing.assert_close(adjoint, p_ref.grad, **TOLERANCES[dtype])


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("stride,lo,hi", [(1, 1, 1), (2, 1, 0)])
def test_conv_on_halo_equals_dense_masked_conv(backend, device, stride, lo, hi):
    """SPEC section 7: a padding-0 conv on the halo'd visible patches gives the dense
    conv (padding 1) of the masked map at visible positions."""
    gen = torch.Generator().manual_seed(stride)
    active = random_mask(2, (3, 2, 3), keep=0.5, generator=gen)
    layout = MaskLayout.build(active)
    patches, slots, neighbours = _on(device, layout)
    x = apply_mask_reference(torch.randn(2, 3, 12, 8, 12, generator=gen), active).to(device)
    weight = torch.randn(4, 3, 3, 3, 3, generator=gen).to(device)
    coarse = MaskLayout.build(active)
    dense = apply_mask_reference(F.conv3d(x, weight, stride=stride, padding=1), active.to(device))
    with use_backend(backend):
        packed = pad_halo(pack_patches(x, patches, slots), neighbours, lo, hi)
        out = unpack_patches(F.conv3d(packed, weight, stride=stride), coarse.patches.to(device),
                             coarse.slots.to(device))
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


def test_gradcheck_cpp_kernels():
    layout, x, _ = _case(2, 2, (2, 2, 1), (2, 3, 2), torch.float64, "cpu", 3)
    packed = pack_patches_reference(x, layout.patches, layout.slots).requires_grad_()
    with use_backend("cpu"):
        assert torch.autograd.gradcheck(
            lambda p: pad_halo(p, layout.neighbours, 1, 1), (packed,))
        assert torch.autograd.gradgradcheck(
            lambda p: pad_halo(p, layout.neighbours, 1, 0), (packed,))
        assert torch.autograd.gradcheck(
            lambda t: unpack_patches(pack_patches(t, layout.patches, layout.slots) * 2,
                                     layout.patches, layout.slots), (x.requires_grad_(),))


def test_opcheck_cpp_operators():
    layout, x, _ = _case(2, 3, (2, 3, 2), (2, 2, 3), torch.float32, "cpu", 5)
    ops = torch.ops.anatomask_fast
    packed = pack_patches_reference(x, layout.patches, layout.slots).requires_grad_()
    torch.library.opcheck(ops.pack_patches.default,
                          (x.requires_grad_(), layout.patches, layout.slots))
    torch.library.opcheck(ops.unpack_patches.default, (packed, layout.patches, layout.slots))
    torch.library.opcheck(ops.pad_halo.default, (packed, layout.neighbours, 1, 0))
    halo = torch.randn(packed.shape[0], 3, 4, 4, 5, requires_grad=True)
    torch.library.opcheck(ops.pad_halo_backward.default, (halo, layout.neighbours, 1, 1))


def test_torch_compile_fullgraph_on_cpu():
    layout, x, _ = _case(2, 2, (2, 2, 2), (2, 2, 2), torch.float32, "cpu", 9)
    x.requires_grad_()

    def step(t):
        packed = pad_halo(pack_patches(t * 2.0, layout.patches, layout.slots),
                          layout.neighbours, 1, 1)
        return (packed ** 2).sum()

    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    loss.backward()
    x_ref = x.detach().clone().requires_grad_()
    expected = (pad_halo_reference(pack_patches_reference(x_ref * 2.0, layout.patches,
                                                          layout.slots),
                                   layout.neighbours, 1, 1) ** 2).sum()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(x.grad, x_ref.grad)


@pytest.mark.parametrize("call,error,match", [
    (lambda x, lay: pack_patches(x[0], lay.patches, lay.slots), ValueError, r"'x' must be 5-D"),
    (lambda x, lay: pack_patches(x, lay.patches.int(), lay.slots), TypeError,
     r"'patches' must have dtype in \(torch.int64\), got torch.int32"),
    (lambda x, lay: pack_patches(x, lay.patches, lay.slots[:1]), ValueError,
     r"'slots' must have batch 2"),
    (lambda x, lay: pack_patches(x[..., :7], lay.patches, lay.slots), ValueError,
     r"grid \(2, 2, 2\) of 'slots' must divide the spatial shape \(8, 8, 7\)"),
    (lambda x, lay: unpack_patches(x, lay.patches, lay.slots), ValueError,
     r"'patches' must have 2 entries"),
    (lambda x, lay: pad_halo(pack_patches(x, lay.patches, lay.slots), lay.neighbours, 5, 1),
     ValueError, r"'lo' must be an int in \[0, 4\].*got 5"),
    (lambda x, lay: pad_halo(pack_patches(x, lay.patches, lay.slots), lay.neighbours[:, :9], 1,
                             1), ValueError, r"'neighbours' must have shape \(\d+, 27\)"),
    (lambda x, lay: pad_halo_backward(pack_patches(x, lay.patches, lay.slots), lay.neighbours,
                                      2, 1), ValueError, r"pad_halo_backward: argument 'lo' must "
                                                         r"be an int in \[0, 1\].*got 2"),
])
def test_bad_input_names_the_argument(call, error, match):
    active = random_mask(2, (2, 2, 2), generator=torch.Generator().manual_seed(0))
    with pytest.raises(error, match=match):
        call(torch.randn(2, 3, 8, 8, 8), MaskLayout.build(active))


def test_public_exports():
    assert anatomask_fast.pad_halo is pad_halo

"""apply_mask on every backend against the reference (repeat_interleave + multiply)."""

import pytest
import torch

import anatomask_fast
from anatomask_fast import use_backend
from anatomask_fast.reference import apply_mask_reference

from .conftest import BACKEND_DEVICES, OPCHECK_BACKENDS
from .helpers import opcheck, random_mask

# (B, C, spatial, grid): odd sizes, anisotropic cells, single-voxel cells, B=1.
SHAPES = [
    (2, 3, (8, 12, 10), (2, 3, 5)),
    (1, 1, (7, 5, 9), (7, 1, 3)),
    (3, 2, (4, 4, 4), (4, 4, 4)),
    (2, 5, (6, 10, 14), (3, 5, 7)),
]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("batch,channels,spatial,grid", SHAPES)
def test_matches_reference_forward_and_backward(
    backend, device, dtype, batch, channels, spatial, grid
):
    gen = torch.Generator().manual_seed(hash((batch, channels, spatial)) % 2**31)
    x = torch.randn(batch, channels, *spatial, generator=gen).to(device, dtype)
    active = random_mask(batch, grid, generator=gen, device=device)
    grad = torch.randn(x.shape, generator=gen).to(device, dtype)

    x_ref = x.clone().requires_grad_()
    expected = apply_mask_reference(x_ref, active)
    expected.backward(grad)

    x_test = x.clone().requires_grad_()
    with use_backend(backend):
        out = anatomask_fast.apply_mask(x_test, active)
    out.backward(grad)
    # Select-or-zero moves values unchanged: equality is exact for every dtype.
    assert torch.equal(out, expected)
    assert torch.equal(x_test.grad, x_ref.grad)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("fill", [True, False], ids=["all-visible", "all-hidden"])
def test_all_visible_and_all_hidden(backend, device, fill):
    x = torch.randn(2, 3, 8, 8, 8, device=device)
    active = torch.full((2, 1, 2, 2, 2), fill, device=device)
    with use_backend(backend):
        out = anatomask_fast.apply_mask(x, active)
    assert torch.equal(out, x if fill else torch.zeros_like(x))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_non_contiguous_input_and_expanded_gradient(backend, device):
    x = torch.randn(2, 8, 6, 4, 3, device=device).permute(0, 4, 1, 2, 3)  # (2, 3, 8, 6, 4)
    active = random_mask(2, (4, 3, 2), device=device)
    x.requires_grad_()
    with use_backend(backend):
        out = anatomask_fast.apply_mask(x, active)
    out.sum().backward()  # the incoming gradient is an expanded (stride 0) tensor
    assert torch.equal(out, apply_mask_reference(x.detach(), active))
    assert torch.equal(x.grad, apply_mask_reference(torch.ones_like(x), active))


def test_gradcheck_cpp_kernel():
    x = torch.randn(2, 2, 4, 6, 2, dtype=torch.float64, requires_grad=True)
    active = random_mask(2, (2, 3, 1))
    with use_backend("cpu"):
        assert torch.autograd.gradcheck(lambda t: anatomask_fast.apply_mask(t, active), (x,))


@pytest.mark.parametrize("backend,device", OPCHECK_BACKENDS)
def test_opcheck(backend, device):
    x = torch.randn(2, 3, 4, 6, 8, requires_grad=True)
    active = random_mask(2, (2, 3, 4))
    opcheck("apply_mask", backend, device, x, active)


def test_torch_compile_fullgraph_on_cpu():
    x = torch.randn(2, 3, 8, 8, 8, requires_grad=True)
    active = random_mask(2, (2, 2, 2))

    def step(t):
        return (anatomask_fast.apply_mask(t * 2.0, active) ** 2).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    loss.backward()
    expected = (apply_mask_reference(x.detach() * 2.0, active) ** 2).sum()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(x.grad, 8.0 * apply_mask_reference(x.detach(), active))


@pytest.mark.parametrize(
    "make_args,error,match",
    [
        (
            lambda x: (x, torch.ones(2, 1, 2, 2, dtype=torch.bool)),
            ValueError,
            r"'active'.*\(2, 1, h, w, d\)",
        ),
        (
            lambda x: (x, torch.ones(3, 1, 2, 2, 2, dtype=torch.bool)),
            ValueError,
            r"'active'.*\(2, 1, h, w, d\)",
        ),
        (
            lambda x: (x, torch.ones(2, 1, 3, 2, 2, dtype=torch.bool)),
            ValueError,
            r"grid \(3, 2, 2\).*'active'.*\(8, 8, 8\)",
        ),
        (
            lambda x: (x, torch.ones(2, 1, 2, 2, 2)),
            TypeError,
            r"'active' must be a bool.*torch.float32",
        ),
        (
            lambda x: (x, torch.ones(2, 1, 2, 2, 2, dtype=torch.bool, device="meta")),
            ValueError,
            r"'active' is on meta",
        ),
        (
            lambda x: (x[0], torch.ones(2, 1, 2, 2, 2, dtype=torch.bool)),
            ValueError,
            r"'x' must be 5-D",
        ),
        (
            lambda x: (x.long(), torch.ones(2, 1, 2, 2, 2, dtype=torch.bool)),
            TypeError,
            r"'x' must have dtype",
        ),
    ],
)
def test_bad_input_names_the_argument(make_args, error, match):
    x = torch.randn(2, 1, 8, 8, 8)
    with pytest.raises(error, match=match):
        anatomask_fast.apply_mask(*make_args(x))

"""densify on every backend against the reference (repeat_interleave + torch.where)."""

import pytest
import torch

import anatomask_fast
from anatomask_fast import use_backend
from anatomask_fast.reference import densify_reference

from .conftest import BACKEND_DEVICES, OPCHECK_BACKENDS
from .helpers import TOLERANCES, opcheck, random_mask

SHAPES = [  # (B, C, spatial, grid): odd sizes, anisotropic and single-voxel cells
    (2, 3, (8, 12, 10), (2, 3, 5)),
    (1, 1, (7, 5, 9), (7, 1, 3)),
    (3, 5, (6, 10, 14), (3, 5, 7)),
]


def check_against_reference(backend, device, dtype, x, active, token):
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    x_ref, t_ref = (t.detach().double().requires_grad_() for t in (x, token))
    expected = densify_reference(x_ref, active, t_ref)
    expected.backward(grad.double())
    x_test, t_test = (t.detach().clone().requires_grad_() for t in (x, token))
    with use_backend(backend):
        out = anatomask_fast.densify(x_test, active, t_test)
    out.backward(grad)
    assert out.dtype == dtype
    # Forward and grad_x only select: exact. The token's gradient is an fp32 sum.
    assert torch.equal(out.double(), expected)
    assert torch.equal(x_test.grad.double(), x_ref.grad)
    torch.testing.assert_close(t_test.grad.double(), t_ref.grad, **TOLERANCES[dtype])


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("batch,channels,spatial,grid", SHAPES)
@pytest.mark.parametrize("token_shape", ["C", "1C111"])
def test_matches_reference(backend, device, dtype, batch, channels, spatial, grid, token_shape):
    gen = torch.Generator().manual_seed(hash((batch, channels, spatial)) % 2**31)
    x = torch.randn(batch, channels, *spatial, generator=gen).to(device, dtype)
    active = random_mask(batch, grid, generator=gen, device=device)
    shape = (channels,) if token_shape == "C" else (1, channels, 1, 1, 1)
    token = torch.randn(shape, generator=gen).to(device, dtype)
    check_against_reference(backend, device, dtype, x, active, token)


def edge_mask(case: str, device: str) -> torch.Tensor:
    """A (2, 1, 2, 2, 2) mask: all visible, or sample 0 with a single visible patch."""
    active = torch.zeros(2, 1, 2, 2, 2, dtype=torch.bool, device=device)
    if case == "all-visible":
        active[:] = True
    else:
        active[0, 0, 1, 0, 1] = True
        active[1, 0, :, 1] = True
    return active


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("case", ["single-visible-patch", "all-visible"])
def test_edge_masks(backend, device, case):
    x = torch.randn(2, 3, 8, 8, 8, device=device)
    active = edge_mask(case, device)
    check_against_reference(
        backend, device, torch.float32, x, active, torch.randn(3, device=device)
    )


def test_gradcheck_cpp_kernel():
    x = torch.randn(2, 2, 4, 6, 2, dtype=torch.float64, requires_grad=True)
    token = torch.randn(1, 2, 1, 1, 1, dtype=torch.float64, requires_grad=True)
    active = random_mask(2, (2, 3, 1))
    with use_backend("cpu"):
        assert torch.autograd.gradcheck(
            lambda a, b: anatomask_fast.densify(a, active, b), (x, token)
        )


@pytest.mark.parametrize("backend,device", OPCHECK_BACKENDS)
def test_opcheck(backend, device):
    x = torch.randn(2, 3, 4, 6, 8, requires_grad=True)
    active = random_mask(2, (2, 3, 4))
    token = torch.randn(3, requires_grad=True)
    opcheck("densify", backend, device, x, active, token)
    opcheck("densify_backward", backend, device, torch.randn(2, 3, 4, 6, 8), active)


def test_torch_compile_fullgraph_on_cpu():
    x = torch.randn(2, 3, 8, 8, 8, requires_grad=True)
    token = torch.randn(1, 3, 1, 1, 1, requires_grad=True)
    active = random_mask(2, (2, 2, 2))

    def step(t, tok):
        return (anatomask_fast.densify(t * 2.0, active, tok) ** 2).sum()

    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(x, token)
    loss.backward()
    x_ref, t_ref = x.detach().requires_grad_(), token.detach().requires_grad_()
    step_ref = (densify_reference(x_ref * 2.0, active, t_ref) ** 2).sum()
    step_ref.backward()
    torch.testing.assert_close(loss, step_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(token.grad, t_ref.grad)


@pytest.mark.parametrize(
    "make_args,error,match",
    [
        (
            lambda x, m: (x, m, torch.randn(4)),
            ValueError,
            r"'mask_token' must have shape \(1, 3, 1, 1, 1\) or \(3,\).*\(4,\)",
        ),
        (lambda x, m: (x, m, torch.randn(1, 3)), ValueError, r"'mask_token'.*got \(1, 3\)"),
        (
            lambda x, m: (x, m, torch.ones(3, dtype=torch.long)),
            TypeError,
            r"'mask_token' must have dtype",
        ),
        (
            lambda x, m: (x, torch.ones(2, 1, 3, 2, 2, dtype=torch.bool), torch.randn(3)),
            ValueError,
            r"grid \(3, 2, 2\).*\(8, 8, 8\)",
        ),
        (lambda x, m: (x[0], m, torch.randn(3)), ValueError, r"'x' must be 5-D"),
    ],
)
def test_bad_input_names_the_argument(make_args, error, match):
    x = torch.randn(2, 3, 8, 8, 8)
    with pytest.raises(error, match=match):
        anatomask_fast.densify(*make_args(x, random_mask(2, (2, 2, 2))))

"""sparse_norm on every backend against the reference (boolean-index gather into an
(n, C) matrix, instance_norm, zeros, scatter back, activation)."""

import pytest
import torch

import anatomask_fast
from anatomask_fast import use_backend
from anatomask_fast.reference import sparse_norm_reference

from .conftest import BACKEND_DEVICES, OPCHECK_BACKENDS
from .helpers import TOLERANCES, opcheck, random_mask
from .test_densify import edge_mask

ACTIVATIONS = [None, "leaky_relu", "relu6"]


def check_against_reference(backend, device, dtype, x, active, *, affine, per_sample, activation):
    gen = torch.Generator().manual_seed(3)
    C = x.shape[1]
    params = [
        torch.randn(C, generator=gen).to(device, dtype) if affine else None,
        torch.randn(C, generator=gen).to(device, dtype) if affine else None,
    ]
    grad = torch.randn(x.shape, generator=gen).to(device, dtype)
    ref_inputs = [
        t.detach().double().requires_grad_() if t is not None else None for t in [x, *params]
    ]
    expected = sparse_norm_reference(
        ref_inputs[0], active, *ref_inputs[1:], per_sample=per_sample, activation=activation
    )
    expected.backward(grad.double())
    inputs = [t.detach().clone().requires_grad_() if t is not None else None for t in [x, *params]]
    with use_backend(backend):
        out = anatomask_fast.sparse_norm(
            inputs[0], active, *inputs[1:], per_sample=per_sample, activation=activation
        )
    out.backward(grad)
    assert out.dtype == dtype
    hidden = ~anatomask_fast.reference.upsample_mask(active, x.shape[2:]).expand_as(x)
    assert torch.equal(out[hidden], torch.zeros_like(out[hidden]))  # exactly zero
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), expected, **tol)
    # Where the pre-activation is within the dtype's rounding of a kink of the
    # activation, a low-precision pass may take the other slope: skip those voxels'
    # gradient (their effect on the sums is within tolerance).
    with torch.no_grad():
        pre = sparse_norm_reference(
            *[t.detach() if t is not None else None for t in ref_inputs[:1]],
            active,
            *[t.detach() if t is not None else None for t in ref_inputs[1:]],
            per_sample=per_sample,
        )
    band = {torch.bfloat16: 0.05, torch.float16: 0.01}.get(dtype, 0.0) * pre.abs().clamp_min(1)
    kink = (pre.abs() < band) | ((pre - 6).abs() < band) if activation else torch.zeros_like(hidden)
    for mine, ref in zip(inputs, ref_inputs):
        if mine is not None:
            got, want = mine.grad.double(), ref.grad
            if got.shape == kink.shape:
                got, want = got.masked_fill(kink, 0), want.masked_fill(kink, 0)
            # Gradients sum over many voxels: scaled by the gradient's size.
            scale = max(1.0, want.abs().max().item())
            torch.testing.assert_close(got / scale, want / scale, **tol)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_sample", [False, True], ids=["pooled", "per-sample"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_matches_reference(backend, device, dtype, per_sample, activation, affine):
    gen = torch.Generator().manual_seed(7)
    # An offset mean checks that the variance does not cancel.
    x = (torch.randn(3, 4, 6, 10, 14, generator=gen) * 2 + 3).to(device, dtype)
    active = random_mask(3, (3, 5, 7), generator=gen, device=device)
    check_against_reference(
        backend,
        device,
        dtype,
        x,
        active,
        affine=affine,
        per_sample=per_sample,
        activation=activation,
    )


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
@pytest.mark.parametrize(
    "batch,channels,spatial,grid", [(2, 3, (8, 12, 10), (2, 3, 5)), (1, 1, (7, 5, 9), (7, 1, 3))]
)
def test_other_dtypes_and_shapes(backend, device, dtype, batch, channels, spatial, grid):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(batch, channels, *spatial, generator=gen).to(device, dtype)
    active = random_mask(batch, grid, generator=gen, device=device)
    check_against_reference(
        backend, device, dtype, x, active, affine=True, per_sample=True, activation="leaky_relu"
    )


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("case", ["single-visible-patch", "all-visible"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["pooled", "per-sample"])
def test_edge_masks(backend, device, case, per_sample):
    x = torch.randn(2, 3, 8, 8, 8, device=device)
    active = edge_mask(case, device)
    check_against_reference(
        backend,
        device,
        torch.float32,
        x,
        active,
        affine=True,
        per_sample=per_sample,
        activation="relu6",
    )


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_backward_saves_input_and_statistics_only(backend):
    x = torch.randn(2, 4, 8, 8, 8, requires_grad=True)
    active = random_mask(2, (2, 2, 2))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with use_backend(backend):
            anatomask_fast.sparse_norm(
                x,
                active,
                torch.ones(4, requires_grad=True),
                None,
                per_sample=True,
                activation="leaky_relu",
            )
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()
    assert sum(t.numel() for t in saved) <= x.numel() + active.numel() + 4 + 2 * 2 * 4


def test_gradcheck_cpp_kernel():
    x = torch.randn(2, 2, 4, 6, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    active = random_mask(2, (2, 3, 1))
    for per_sample in (False, True):
        with use_backend("cpu"):
            assert torch.autograd.gradcheck(
                lambda *t: anatomask_fast.sparse_norm(
                    t[0], active, t[1], t[2], per_sample=per_sample, activation="leaky_relu"
                ),
                (x, w, b),
                fast_mode=True,
            )


@pytest.mark.parametrize("backend,device", OPCHECK_BACKENDS)
def test_opcheck(backend, device):
    x = torch.randn(2, 3, 4, 6, 8, requires_grad=True)
    active = random_mask(2, (2, 3, 4))
    w, b = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    opcheck("sparse_norm", backend, device, x, active, w, b, True, 1e-5, "relu6")
    opcheck("sparse_norm", backend, device, x, active, None, None, False, 1e-5, "none")
    _, mean, rstd = torch.ops.anatomask_fast.sparse_norm(x, active, w, b, False, 1e-5, "leaky_relu")
    opcheck(
        "sparse_norm_backward",
        backend,
        device,
        torch.randn(x.shape),
        x.detach(),
        active,
        w.detach(),
        b.detach(),
        mean,
        rstd,
        "leaky_relu",
    )


def test_torch_compile_fullgraph_on_cpu():
    x = torch.randn(2, 3, 8, 8, 8, requires_grad=True)
    w = torch.randn(3, requires_grad=True)
    active = random_mask(2, (2, 2, 2))

    def step(t, weight, norm):
        return (
            norm(t * 2.0, active, weight, None, per_sample=True, activation="leaky_relu") ** 2
        ).sum()

    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(
        x, w, anatomask_fast.sparse_norm
    )
    loss.backward()
    x_ref, w_ref = x.detach().requires_grad_(), w.detach().requires_grad_()
    expected = step(x_ref, w_ref, sparse_norm_reference)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(weight=torch.randn(4)), ValueError, r"'weight' must have shape \(3,\).*\(4,\)"),
        (dict(bias=torch.randn(1, 3)), ValueError, r"'bias' must have shape \(3,\)"),
        (dict(activation="gelu"), ValueError, r"'activation' must be one of.*'gelu'"),
        (dict(eps=0.0), ValueError, r"'eps' must be positive"),
        (dict(active=torch.ones(2, 1, 3, 2, 2, dtype=torch.bool)), ValueError, r"grid \(3, 2, 2\)"),
    ],
)
def test_bad_input_names_the_argument(kwargs, error, match):
    args = dict(
        x=torch.randn(2, 3, 8, 8, 8), active=random_mask(2, (2, 2, 2)), weight=None, bias=None
    )
    args.update(kwargs)
    with pytest.raises(error, match=match):
        anatomask_fast.sparse_norm(
            args.pop("x"), args.pop("active"), args.pop("weight"), args.pop("bias"), **args
        )

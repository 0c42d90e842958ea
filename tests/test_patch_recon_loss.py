"""patch_recon_loss on every backend against the reference (patchify, normalize,
squared error, masked mean), forward and both gradient paths (loss and per_patch)."""

import pytest
import torch

from anatomask_fast import patch_recon_loss, use_backend
from anatomask_fast.reference import patch_recon_loss_reference

from .conftest import BACKEND_DEVICES, OPCHECK_BACKENDS, gpu
from .helpers import TOLERANCES, opcheck, random_mask

# (B, C, spatial, patch): C > 1, anisotropic, B=1, odd sizes, one patch along d.
SHAPES = [
    (2, 3, (8, 12, 10), (4, 6, 5)),
    (1, 1, (16, 16, 16), (8, 8, 8)),
    (3, 2, (6, 4, 9), (3, 2, 3)),
    (2, 1, (8, 8, 16), (2, 4, 16)),
]
MODES = [
    dict(norm_pix=True),
    dict(norm_pix=False),
    dict(norm_pix=True, hidden_only=True),
    dict(norm_pix=False, hidden_only=True),
]
# Per-patch results are fp32 from identical input values on every backend: they differ
# only in the order of fp32 sums (float64 inputs are computed in float64).
RESULT_TOLERANCES = {
    dtype: TOLERANCES[torch.float64 if dtype == torch.float64 else torch.float32]
    for dtype in TOLERANCES
}


def grid_of(spatial, patch):
    return tuple(s // p for s, p in zip(spatial, patch))


def run(fn, rec, x, active, patch, **options):
    """(loss, per_patch, rec.grad) with a gradient through both outputs."""
    rec = rec.detach().clone().requires_grad_()
    loss, per_patch = fn(rec, x, active, patch, **options)
    weights = torch.linspace(
        0.5, 2.0, per_patch.numel(), dtype=per_patch.dtype, device=per_patch.device
    ).view(per_patch.shape)
    (loss + (per_patch * weights).sum()).backward()
    return loss.detach(), per_patch.detach(), rec.grad


def run_backend(backend, *args, **options):
    def fused(*inner, **kw):
        with use_backend(backend):
            return patch_recon_loss(*inner, **kw)

    return run(fused, *args, **options)


def assert_matches(got, expected, dtype):
    loss, per_patch, grad = got
    loss_ref, per_patch_ref, grad_ref = expected
    assert loss.dtype == per_patch.dtype == loss_ref.dtype
    assert grad.dtype == dtype
    torch.testing.assert_close(loss, loss_ref, **RESULT_TOLERANCES[dtype])
    torch.testing.assert_close(per_patch, per_patch_ref, **RESULT_TOLERANCES[dtype])
    torch.testing.assert_close(grad, grad_ref, **TOLERANCES[dtype])


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("options", MODES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("batch,channels,spatial,patch", SHAPES)
def test_matches_reference(backend, device, dtype, options, batch, channels, spatial, patch):
    gen = torch.Generator().manual_seed(hash((batch, channels, spatial)) % 2**31)
    # An offset and a scale per volume, so the normalization has something to remove.
    x = (3 * torch.randn(batch, channels, *spatial, generator=gen) + 1.5).to(device, dtype)
    rec = torch.randn(x.shape, generator=gen).to(device, dtype)
    active = random_mask(batch, grid_of(spatial, patch), generator=gen, device=device)
    expected = run(patch_recon_loss_reference, rec, x, active, patch, **options)
    got = run_backend(backend, rec, x, active, patch, **options)
    assert_matches(got, expected, dtype)
    assert torch.all(got[1][active.view(batch, -1)] == 0)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("hidden_only", [False, True])
def test_all_visible_gives_zero_without_nan(backend, device, hidden_only):
    x = torch.randn(2, 2, 8, 8, 8, device=device)
    rec = torch.randn(x.shape, device=device)
    active = torch.ones(2, 1, 2, 2, 2, dtype=torch.bool, device=device)
    loss, per_patch, grad = run_backend(backend, rec, x, active, 4, hidden_only=hidden_only)
    assert loss.item() == 0 and torch.all(per_patch == 0) and torch.all(grad == 0)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_all_hidden(backend, device):
    x = torch.randn(2, 1, 8, 8, 12, device=device)
    rec = torch.randn(x.shape, device=device)
    active = torch.zeros(2, 1, 2, 2, 3, dtype=torch.bool, device=device)
    expected = run(patch_recon_loss_reference, rec, x, active, 4)
    assert_matches(run_backend(backend, rec, x, active, 4), expected, torch.float32)
    assert torch.all(expected[1] > 0)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("value", [0.75, -3.0])
def test_constant_patch_has_zero_variance(backend, device, value):
    # Sums of these values are exact in fp32: mean == value, var == 0, t' == 0.
    x = torch.randn(1, 2, 8, 8, 8, device=device)
    x[:, :, :4, :4, 4:] = value
    rec = torch.randn(x.shape, device=device)
    active = torch.zeros(1, 1, 2, 2, 2, dtype=torch.bool, device=device)
    loss, per_patch, grad = run_backend(backend, rec, x, active, 4)
    constant = rec[0, :, :4, :4, 4:]
    torch.testing.assert_close(per_patch[0, 1], (constant**2).mean())
    expected = run(patch_recon_loss_reference, rec, x, active, 4)
    assert_matches((loss, per_patch, grad), expected, torch.float32)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_patches_larger_than_one_chunk(backend, device, monkeypatch):
    """The Triton forward streams patches larger than its one-chunk limit."""
    if backend == "triton":
        from anatomask_fast.kernels import patch_loss as kernels

        monkeypatch.setitem(kernels.MAX_ONE_CHUNK, device, 64)
        monkeypatch.setitem(kernels.CHUNK, device, 128)  # 4.5 chunks per patch
    x = torch.randn(2, 3, 8, 8, 12, device=device)
    rec = torch.randn(x.shape, device=device)
    active = random_mask(2, (1, 2, 2), device=device)
    for options in MODES:
        expected = run(patch_recon_loss_reference, rec, x, active, (8, 4, 6), **options)
        got = run_backend(backend, rec, x, active, (8, 4, 6), **options)
        assert_matches(got, expected, torch.float32)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_non_contiguous_inputs_and_no_gradient_to_x(backend, device):
    x = torch.randn(2, 8, 6, 4, 3, device=device).permute(0, 4, 1, 2, 3).requires_grad_()
    rec = torch.randn(2, 4, 6, 8, 3, device=device).permute(0, 4, 3, 2, 1)
    active = random_mask(2, (4, 3, 2), device=device)
    expected = run(patch_recon_loss_reference, rec, x.detach(), active, 2)
    assert_matches(run_backend(backend, rec, x, active, 2), expected, torch.float32)
    assert x.grad is None


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_teacher_call_without_gradient(backend, device):
    x = torch.randn(2, 1, 8, 8, 8, device=device)
    rec = torch.randn(x.shape, device=device, requires_grad=True)
    active = random_mask(2, (2, 2, 2), device=device)
    with torch.no_grad(), use_backend(backend):
        loss, per_patch = patch_recon_loss(rec, x, active, 4, norm_pix=False)
    assert not loss.requires_grad and not per_patch.requires_grad
    hidden = (~active).view(2, -1)
    raw = ((rec.detach() - x).view(2, 2, 4, 2, 4, 2, 4) ** 2).mean(dim=(2, 4, 6)).reshape(2, -1)
    torch.testing.assert_close(per_patch, raw * hidden)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_non_finite_visible_prediction(backend, device):
    """Like the reference, a NaN in a visible patch makes the loss NaN (e * 0);
    hidden_only never reads visible patches."""
    x = torch.randn(1, 1, 8, 8, 8, device=device)
    rec = torch.randn(x.shape, device=device)
    active = torch.tensor([True, False] * 4, device=device).view(1, 1, 2, 2, 2)
    rec[0, 0, 0, 0, 0] = float("nan")  # patch 0, visible
    with use_backend(backend):
        assert torch.isnan(patch_recon_loss(rec, x, active, 4)[0])
        loss, per_patch = patch_recon_loss(rec, x, active, 4, hidden_only=True)
    clean = rec.clone()
    clean[0, 0, 0, 0, 0] = 0
    torch.testing.assert_close(loss, patch_recon_loss_reference(clean, x, active, 4)[0])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("options", MODES[:2])
def test_gradcheck_float64(backend, options):
    x = torch.randn(2, 2, 4, 6, 4, dtype=torch.float64)
    rec = torch.randn(x.shape, dtype=torch.float64, requires_grad=True)
    active = random_mask(2, (2, 3, 1))

    def both(r):
        with use_backend(backend):
            return patch_recon_loss(r, x, active, (2, 2, 4), **options)

    assert torch.autograd.gradcheck(both, (rec,))


@pytest.mark.parametrize("backend,device", OPCHECK_BACKENDS)
def test_opcheck(backend, device):
    x = torch.randn(2, 3, 4, 6, 8)
    rec = torch.randn(x.shape, requires_grad=True)
    active = random_mask(2, (2, 3, 4))
    for norm_pix, hidden_only in [(True, False), (False, True)]:
        opcheck("patch_recon_loss", backend, device, rec, x, active, norm_pix, 1e-6, hidden_only)
    _, mean, rstd = torch.ops.anatomask_fast.patch_recon_loss(rec, x, active, True, 1e-6, False)
    grad = torch.randn(mean.shape)
    opcheck(
        "patch_recon_loss_backward",
        backend,
        device,
        grad,
        rec.detach(),
        x,
        active,
        mean,
        rstd,
        False,
    )


@pytest.mark.parametrize(
    "backend,device",
    [
        pytest.param("cpu", "cpu", id="cpu"),
        pytest.param("triton", "cuda", id="triton-cuda", marks=[gpu, pytest.mark.gpu]),
        pytest.param("cuda", "cuda", id="cuda", marks=[gpu, pytest.mark.gpu]),
    ],
)
def test_torch_compile_fullgraph(backend, device):
    x = torch.randn(2, 1, 8, 8, 8, device=device)
    rec = torch.randn(x.shape, device=device, requires_grad=True)
    active = random_mask(2, (2, 2, 2), device=device)

    def step(r):
        loss, per_patch = patch_recon_loss(r * 2.0, x, active, 4)
        return loss + per_patch.max()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with use_backend(backend):
        out = compiled(rec)
    out.backward()
    ref_rec = rec.detach().clone().requires_grad_()
    loss, per_patch = patch_recon_loss_reference(ref_rec * 2.0, x, active, 4)
    (loss + per_patch.max()).backward()
    torch.testing.assert_close(out, loss + per_patch.max())
    torch.testing.assert_close(rec.grad, ref_rec.grad)


def _args(**changes):
    x = torch.randn(2, 1, 8, 8, 8)
    args = dict(rec=torch.randn(2, 1, 8, 8, 8), x=x, active=random_mask(2, (2, 2, 2)), patch_size=4)
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "changes,error,match",
    [
        (
            dict(rec=torch.randn(2, 1, 8, 8, 4)),
            ValueError,
            r"'rec'.*shape of 'x' \(2, 1, 8, 8, 8\).*\(2, 1, 8, 8, 4\)",
        ),
        (
            dict(rec=torch.randn(2, 1, 8, 8, 8, dtype=torch.float64)),
            TypeError,
            r"'rec'.*dtype of 'x'.*float64",
        ),
        (dict(rec=torch.randn(2, 1, 8, 8, 8, device="meta")), ValueError, r"'rec' is on meta"),
        (
            dict(active=torch.ones(2, 1, 2, 2, 2, dtype=torch.bool, device="meta")),
            ValueError,
            r"'active' is on meta",
        ),
        (
            dict(patch_size=3),
            ValueError,
            r"spatial shape \(8, 8, 8\).*divisible.*'patch_size' \(3, 3, 3\)",
        ),
        (dict(patch_size=(4, 4)), ValueError, r"'patch_size' must be 3 positive ints.*\(4, 4\)"),
        (dict(patch_size=0), ValueError, r"'patch_size' must be 3 positive ints.*\(0, 0, 0\)"),
        (dict(patch_size=4.0), TypeError, r"'patch_size' must be an int or 3 ints, got 4.0"),
        (
            dict(patch_size=2),
            ValueError,
            r"'active' must have the patch grid \(2, 1, 4, 4, 4\).*\(2, 1, 2, 2, 2\)",
        ),
        (
            dict(active=torch.ones(2, 1, 2, 2, 2)),
            TypeError,
            r"'active' must be a bool.*torch.float32",
        ),
        (
            dict(active=torch.ones(3, 1, 2, 2, 2, dtype=torch.bool)),
            ValueError,
            r"'active'.*\(2, 1, h, w, d\)",
        ),
        (dict(x=torch.randn(2, 8, 8, 8)), ValueError, r"'x' must be 5-D"),
        (dict(x=torch.ones(2, 1, 8, 8, 8, dtype=torch.long)), TypeError, r"'x' must have dtype"),
    ],
)
def test_bad_input_names_the_argument(changes, error, match):
    with pytest.raises(error, match=match):
        patch_recon_loss(**_args(**changes))

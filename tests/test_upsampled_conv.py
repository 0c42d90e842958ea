"""The convolution of a nearest-up-sampled map computed on the low-resolution map: equal
to up-sampling then convolving, forward and backward, for every stride / kernel kind
STU-Net's plans give (isotropic, anisotropic, stride 1 along an axis, 1x1x1), odd
sizes; and it keeps only the low-resolution map for backward."""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks

from anatomask_fast.models.upsampled_conv import upsampled_conv

from .conftest import gpu

CASES = [
    ((2, 2, 2), (3, 3, 3)),
    ((1, 2, 2), (1, 3, 3)),
    ((2, 1, 2), (3, 3, 1)),
    ((1, 1, 1), (3, 3, 3)),
    ((2, 2, 2), (1, 1, 1)),
    ((2, 2, 2), (1, 3, 3)),
    ((3, 2, 1), (5, 3, 3)),
    ((2, 2, 2), (2, 2, 2)),
]


def _plain(low, weight, scale):
    return F.conv3d(
        F.interpolate(low, scale_factor=scale, mode="nearest"),
        weight,
        padding=[k // 2 for k in weight.shape[2:]],
    )


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[gpu, pytest.mark.gpu])])
@pytest.mark.parametrize("scale,kernel", CASES)
def test_equals_upsampling_then_convolving(scale, kernel, device):
    generator = torch.Generator().manual_seed(sum(scale) * 7 + sum(kernel))
    low = (
        torch.randn(2, 3, 5, 4, 3, dtype=torch.float64, generator=generator)
        .to(device)
        .requires_grad_()
    )
    weight = (
        torch.randn(4, 3, *kernel, dtype=torch.float64, generator=generator)
        .to(device)
        .requires_grad_()
    )
    expected = _plain(low, weight, scale)
    got = upsampled_conv(low, weight, scale)
    # fp64: only the order of the sums differs (taps summed first), ~1e-15 relative.
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn(expected.shape, dtype=torch.float64, generator=generator).to(device)
    for g, e in zip(
        torch.autograd.grad(got, (low, weight), grad),
        torch.autograd.grad(expected, (low, weight), grad),
    ):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-11)


def test_float32_and_bf16_autocast_agree_with_the_plain_path():
    torch.manual_seed(0)
    low = torch.randn(2, 6, 7, 6, 5, requires_grad=True)
    weight = (torch.randn(5, 6, 3, 3, 3) * 0.1).requires_grad_()
    grad = torch.randn(2, 5, 14, 12, 10)
    exact = [t.double().detach().requires_grad_() for t in (low, weight)]
    reference = torch.autograd.grad(_plain(*exact, (2, 2, 2)), exact, grad.double())
    out32 = upsampled_conv(low, weight, (2, 2, 2))
    torch.testing.assert_close(out32, _plain(low, weight, (2, 2, 2)), rtol=1e-5, atol=1e-5)
    for dtype, tolerance in ((None, 1e-5), (torch.bfloat16, 3e-2)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            out = upsampled_conv(low, weight, (2, 2, 2))
        assert out.dtype == (dtype or torch.float32)
        grads = torch.autograd.grad(out, (low, weight), grad.to(out.dtype))
        for g, r, t in zip(grads, reference, (low, weight)):
            assert g.dtype == t.dtype
            # bf16 keeps 8 mantissa bits: relative errors of a few 1e-3 per product.
            assert ((g.double() - r).norm() / r.norm()).item() < tolerance


def test_keeps_only_the_low_resolution_map():
    low = torch.randn(1, 4, 6, 6, 6, requires_grad=True)
    weight = torch.randn(4, 4, 3, 3, 3, requires_grad=True)
    saved = []
    with saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = upsampled_conv(low * 1.0, weight, (2, 2, 2))
    assert out.shape == (1, 4, 12, 12, 12)
    assert sorted(saved) == sorted([low.numel(), weight.numel()])

"""The teacher's ranking rules (``train.teacher.ranking_errors``) against a literal
computation on patchified copies, on fresh random inputs with odd grids and two
channels, and the anatomical mask they feed: the hard patches are the top errors,
and with ``foreground`` a patch of background (the sample's minimum) is never chosen
while enough hidden foreground patches exist."""

import pytest
import torch

from anatomask_fast import anatomical_mask, random_mask
from anatomask_fast.reference.patch_loss import patchify
from anatomask_fast.train.teacher import (
    BACKGROUND_TOLERANCE,
    TARGETS,
    foreground_share,
    ranking_errors,
)

P = 4


def literal(
    rec: torch.Tensor, x: torch.Tensor, active: torch.Tensor, target: str, foreground: bool
) -> torch.Tensor:
    """The rule written out on (B, L, N) patch copies in float64."""
    t, r = patchify(x.double(), P), patchify(rec.double(), P)
    if target == "normalized":
        t_used = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    else:
        t_used = t
    diff = r - t_used
    if target == "centred":
        error = diff.var(-1, unbiased=False)
    else:
        error = (diff**2).mean(-1)
    if target == "relative":
        error = error / (t.var(-1) + 1e-6)
    error = error * (~active.flatten(1))
    if foreground:
        low = x.double().amin((2, 3, 4), keepdim=True)
        span = x.double().amax((2, 3, 4), keepdim=True) - low
        above = (x.double() > low + BACKGROUND_TOLERANCE * span).any(1, keepdim=True)
        error = error * patchify(above.double(), P).mean(-1)
    return error


def _inputs(seed: int, background: bool = False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 2, 3 * P, 5 * P, 2 * P, generator=gen) * 2 + 0.5
    if background:  # clipped air: a block of patches at every channel's minimum
        x[:, :, :P] = x.amin((2, 3, 4), keepdim=True) - 1.0
    rec = torch.randn(x.shape, generator=gen) * 0.3
    mask = random_mask((3, 1, 3, 5, 2), 0.6, seed=seed)
    return rec, x, mask.active


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("foreground", [False, True])
def test_rules_against_the_literal_computation(target, foreground):
    for seed in range(3):
        rec, x, active = _inputs(seed, background=seed == 2)
        got = ranking_errors(rec, x, active, P, target=target, foreground=foreground)
        want = literal(rec, x, active, target, foreground)
        assert got.shape == (3, 30) and got.dtype == torch.float32
        assert (got[active.flatten(1)] == 0).all()
        # fp32 sums of 128 values against float64 (rtol); centred is a difference of two
        # fp32 values of the raw error's size, so its rounding is relative to that size.
        scale = literal(rec, x, active, "raw", foreground).abs().max().item()
        atol = 5e-5 * scale if target == "centred" else 1e-6
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=atol)


def test_foreground_share_counts_voxels_above_the_minimum():
    x = torch.randn(2, 1, 2 * P, P, P)
    x[0, 0, :P] = x[0].min() - 3.0  # sample 0: its first patch at the minimum
    x[0, 0, P, 0, 0] = x[0].min()  # one voxel of the second patch too
    share = foreground_share(x, P)
    assert share[0].tolist() == pytest.approx([0.0, 1 - 1 / P**3])
    # Sample 1's minimum is a single voxel: every other voxel is foreground.
    assert share[1].sum().item() == pytest.approx(2 - 1 / P**3)


@pytest.mark.parametrize("target", TARGETS)
def test_the_anatomical_mask_takes_the_top_errors_and_skips_background(target):
    rec, x, active = _inputs(5, background=True)
    shape = active.shape
    for foreground in (False, True):
        errors = ranking_errors(rec, x, active, P, target=target, foreground=foreground)
        mask = anatomical_mask(errors.view(shape), 0.6, 0.5, seed=11)
        hard = mask.hard.flatten(1)
        n_hard = int(hard[0].sum())
        assert n_hard == int((30 - round(30 * 0.4)) * 0.5)
        for b in range(3):
            top = errors[b].argsort(descending=True, stable=True)[:n_hard]
            assert set(top.tolist()) == set(hard[b].nonzero().flatten().tolist())
        if foreground:
            background = foreground_share(x, P) == 0
            hidden_foreground = (~active.flatten(1) & ~background).sum(1)
            assert (hidden_foreground >= n_hard).all()
            assert not (hard & background).any()

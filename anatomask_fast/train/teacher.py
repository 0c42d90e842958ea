"""The teacher's side of a pretraining step: its reconstruction (eval mode, no
gradient) and the per-patch errors that rank the patches for the anatomical mask.

Ranking rules (``target``, and ``foreground``), all zero at the teacher's visible
patches so that they feed :func:`anatomask_fast.anatomical_mask` unchanged:

- ``raw`` (published): ``mean((r - t)^2)`` against the raw patch ``t``;
- ``normalized``: against the patch normalized by its mean and unbiased std (the
  student's target);
- ``centred``: the raw error without its mean offset, ``mean((r - t)^2) -
  (mean(r) - mean(t))^2`` (the population variance of ``r - t``). An untrained
  teacher predicts values near zero, so its raw error is about ``mean(t^2)``: the
  patches whose intensity sits far from the normalization's zero (air and dense bone
  under a CT scheme that z-scores by the foreground's mean) outrank soft tissue.
  Removing the offset ranks by what the teacher fails to reproduce inside a patch;
- ``relative``: the raw error divided by the patch's unbiased variance (+ 1e-6);
- ``foreground``: the errors weighted by the patch's share of voxels above the
  sample's minimum intensity (nnU-Net's "above the minimum" foreground, as the store
  takes it for its statistics): clipped air and padding, which carry nothing to
  reconstruct, rank last.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .. import patch_recon_loss
from .config import TEACHER_TARGETS
from .step import autocast

TARGETS = TEACHER_TARGETS
# Voxels within this share of a sample's intensity range above its minimum count as
# background (absorbs the rounding of clipped values through the augmentation).
BACKGROUND_TOLERANCE = 1e-3


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def teacher_reconstruction(
    teacher: torch.nn.Module, x: torch.Tensor, active: torch.Tensor, amp: str = "none"
) -> torch.Tensor:
    """The EMA teacher's reconstruction under the visible mask ``active``, in ``x``'s
    dtype. The teacher runs in eval mode (timm ``ModelEma``: decoder BatchNorm with its
    running statistics, left unchanged), without gradients."""
    with torch.no_grad(), eval_mode(teacher), autocast(x.device, amp):
        return teacher(x, active).to(x.dtype)


def patch_means(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, L) mean over channels and voxels of each patch, ``l = (i*w + j)*d + k``."""
    return F.avg_pool3d(x.mean(1, keepdim=True), patch).flatten(1)


def patch_variance(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, L) unbiased variance of each patch's values (all channels)."""
    n = x.shape[1] * patch**3
    means = F.avg_pool3d(x.mean(1, keepdim=True), patch)
    # Deviations from the patch mean first: E[x^2] - E[x]^2 cancels in fp32 where the
    # variance is small against the mean (clipped air), exactly the patches that matter.
    spread = x - F.interpolate(means, scale_factor=patch, mode="nearest")
    return F.avg_pool3d((spread * spread).mean(1, keepdim=True), patch).flatten(1) * n / (n - 1)


def foreground_share(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, L) share of each patch's voxels above the sample's minimum in some channel."""
    low = x.amin(dim=(2, 3, 4), keepdim=True)
    span = x.amax(dim=(2, 3, 4), keepdim=True) - low
    above = (x > low + BACKGROUND_TOLERANCE * span).any(1, keepdim=True)
    return F.avg_pool3d(above.to(x.dtype), patch).flatten(1)


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise ValueError(f"--teacher-target must be one of {', '.join(TARGETS)}, got {target!r}")
    return target


def ranking_errors(
    rec: torch.Tensor,
    x: torch.Tensor,
    active: torch.Tensor,
    patch: int,
    *,
    target: str = "raw",
    foreground: bool = False,
) -> torch.Tensor:
    """Per-patch errors (B, L) of a teacher reconstruction by one ranking rule (see the
    module's docstring), zero at visible patches."""
    check_target(target)
    with torch.no_grad():
        errors = patch_recon_loss(
            rec, x, active, patch, norm_pix=target == "normalized", hidden_only=True
        )[1]
        if target == "centred":
            hidden = ~active.flatten(1)
            offset = (patch_means(rec, patch) - patch_means(x, patch)) ** 2
            errors = (errors - offset * hidden).clamp_min(0)
        elif target == "relative":
            errors = errors / (patch_variance(x, patch) + 1e-6)
        if foreground:
            errors = errors * foreground_share(x, patch)
    return errors

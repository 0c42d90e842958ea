"""Patch-loss family: the per-patch reconstruction loss computed straight from the
dense volumes (no patchified copies, no normalized-target or squared-error tensor)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _extension, autograd
from ..contracts import check_like
from ..dispatch import Op
from ..numerics import accumulation_dtype
from ..reference.patch_loss import patch_recon_loss_reference
from ..validation import check_active_mask, check_eps, check_volume, register_fake

PATCH_RECON_LOSS = Op(
    "patch_recon_loss",
    reference=patch_recon_loss_reference,
    cpp="patch_recon_loss",
    triton="patch_loss:patch_recon_loss_triton",
)

_NAME = "patch_recon_loss"


def _check_patch_size(patch_size: object) -> tuple[int, int, int]:
    if isinstance(patch_size, int) and not isinstance(patch_size, bool):
        patch_size = (patch_size,) * 3
    if not isinstance(patch_size, Sequence) or not all(
        isinstance(p, int) and not isinstance(p, bool) for p in patch_size
    ):
        raise TypeError(
            f"{_NAME}: argument 'patch_size' must be an int or 3 ints, got {patch_size!r}"
        )
    if len(patch_size) != 3 or min(patch_size) <= 0:
        raise ValueError(
            f"{_NAME}: argument 'patch_size' must be 3 positive ints "
            f"(ph, pw, pd), got {tuple(patch_size)}"
        )
    return tuple(patch_size)


def _check_inputs(
    rec: torch.Tensor, x: torch.Tensor, active: torch.Tensor, patch_size: object
) -> tuple[int, int, int]:
    check_volume(_NAME, "x", x)
    check_like(_NAME, "rec", rec, x, "x")
    patch = _check_patch_size(patch_size)
    spatial = tuple(x.shape[2:])
    if any(s % p for s, p in zip(spatial, patch)):
        raise ValueError(
            f"{_NAME}: the spatial shape {spatial} of 'x' must be divisible by 'patch_size' {patch}"
        )
    cell = check_active_mask(_NAME, active, x)
    if cell != patch:
        grid = tuple(s // p for s, p in zip(spatial, patch))
        raise ValueError(
            f"{_NAME}: argument 'active' must have the patch grid "
            f"{(x.shape[0], 1, *grid)} of 'x' at 'patch_size' {patch}, "
            f"got {tuple(active.shape)}"
        )
    return patch


def patch_recon_loss(
    rec: torch.Tensor,
    x: torch.Tensor,
    active: torch.Tensor,
    patch_size: int | Sequence[int],
    *,
    norm_pix: bool = True,
    eps: float = 1e-6,
    hidden_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The masked reconstruction loss of masked image modeling: per patch ``l`` of
    sample ``b``, with ``t`` the patch of ``x`` (N values) and ``r`` the same cells of
    ``rec``, ``e[b, l] = mean((r - t')^2)`` where ``t' = (t - mean(t)) / sqrt(var(t) +
    eps)`` (unbiased variance; ``t' = t`` without ``norm_pix``), and ``loss = sum(e *
    hidden) / (sum(hidden) + 1e-8)`` over the hidden patches.

    ``rec`` and ``x`` are ``(B, C, H, W, D)`` of one float dtype, ``active`` the bool
    ``(B, 1, h, w, d)`` visible mask (True = visible) at ``patch_size`` (an int for
    cubic patches or ``(ph, pw, pd)``). Returns ``(loss, per_patch)``: the scalar mean
    of the per-patch error over hidden patches and the ``(B, L)`` map of
    ``e[b, l] * hidden[b, l]`` (``l = (i*w + j)*d + k``), both fp32 (float64 for float64
    inputs). Gradients flow to ``rec`` through both outputs; ``x`` is data.

    - ``norm_pix=True`` (student): the target is each patch normalized by its mean and
      ``sqrt(unbiased var + eps)``.
    - ``norm_pix=False``: the raw patch is the target: the reference's teacher error,
      ``with torch.no_grad(): patch_recon_loss(rec1, x, active1, p, norm_pix=False)``.
      A teacher with the normalized target is the same call with ``norm_pix=True``.
    - ``hidden_only=True`` reads and writes only the hidden patches (work
      proportional to the hidden share). Results are the same, except that
      non-finite values of ``rec`` in visible patches are ignored instead of turning
      the loss into NaN as ``e * 0`` does in the reference.
    """
    patch = _check_inputs(rec, x, active, patch_size)
    check_eps(_NAME, eps)
    backend = PATCH_RECON_LOSS.select(rec.device)
    kernel = PATCH_RECON_LOSS.kernel(backend)
    if backend == "reference":
        return kernel(rec, x, active, patch, norm_pix=norm_pix, eps=eps, hidden_only=hidden_only)
    per_patch, _, _ = kernel(rec, x, active, norm_pix, float(eps), hidden_only)
    n_hidden = active.numel() - active.sum(dtype=per_patch.dtype)
    return per_patch.sum() / (n_hidden + 1e-8), per_patch


def _register_cpp() -> None:
    """Fake kernels and autograd for the C++ operators (schemas in csrc/ops.cpp)."""

    @register_fake("anatomask_fast::patch_recon_loss")
    def _(rec, x, active, norm_pix, eps, hidden_only):
        return patch_stats_like(rec, active)

    @register_fake("anatomask_fast::patch_recon_loss_backward")
    def _(grad_per_patch, rec, x, active, mean, rstd, hidden_only):
        return torch.empty_like(rec, memory_format=torch.contiguous_format)

    autograd.register_cpp(autograd.patch_loss)


def patch_stats_like(
    rec: torch.Tensor, active: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty (per_patch, mean, rstd), each (B, L), for the fake kernels."""
    shape = (active.shape[0], active[0].numel())
    dtype = accumulation_dtype(rec.dtype)
    return tuple(rec.new_empty(shape, dtype=dtype) for _ in range(3))


if _extension.load()[0] is not None:
    _register_cpp()

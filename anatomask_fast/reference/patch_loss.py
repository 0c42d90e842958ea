"""Reference per-patch reconstruction loss, ``e[b, l] = mean((r - t')^2)`` with the
patch normalized ``t' = (t - mean(t)) / sqrt(var(t) + eps)`` (unbiased variance; the
raw patch for the teacher's error) and ``loss = sum(e * hidden) / (sum(hidden) + 1e-8)``,
computed the way the published SparK/AnatoMask code does: patchified copies, a
normalized-target tensor, a squared-error tensor."""

from __future__ import annotations

import torch


def patchify(x: torch.Tensor, patch_size: int | tuple[int, int, int]) -> torch.Tensor:
    """(B, C, H, W, D) -> (B, L, N) copy, patch index ``l = (i*w + j)*d + k`` and the
    N = C*ph*pw*pd values of a patch channel-major."""
    B, C, H, W, D = x.shape
    ph, pw, pd = (patch_size,) * 3 if isinstance(patch_size, int) else patch_size
    h, w, d = H // ph, W // pw, D // pd
    x = x.reshape(B, C, h, ph, w, pw, d, pd).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(B, h * w * d, C * ph * pw * pd)


def patch_recon_loss_reference(
    rec: torch.Tensor,
    x: torch.Tensor,
    active: torch.Tensor,
    patch_size: int | tuple[int, int, int],
    *,
    norm_pix: bool = True,
    eps: float = 1e-6,
    hidden_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, per_patch)``: the masked mean of the per-patch squared error and the
    ``(B, L)`` map ``e * hidden``. The target is data (no gradient to ``x``);
    ``norm_pix`` normalizes it per patch with the unbiased variance and ``eps`` inside
    the square root (the student's loss); ``norm_pix=False`` compares with the raw
    patch (the reference's teacher quirk). Computed in fp32 (float64 for float64
    inputs). ``hidden_only`` selects the hidden patches' errors instead of multiplying
    by ``hidden``, so that non-finite values in visible patches are ignored; the
    published code's ``e * hidden`` is the default."""
    dtype = torch.promote_types(rec.dtype, torch.float32)
    target = patchify(x.detach().to(dtype), patch_size)
    pred = patchify(rec.to(dtype), patch_size)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps) ** 0.5
    error = ((pred - target) ** 2).mean(dim=-1)
    hidden = active.logical_not().to(dtype).view(active.shape[0], -1)
    per_patch = torch.where(hidden.bool(), error, 0) if hidden_only else error * hidden
    return per_patch.sum() / (hidden.sum() + 1e-8), per_patch

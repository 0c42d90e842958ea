"""Instance normalization of packed patches (N, C, q, q, q): statistics per channel
over the visible voxels of each sample (``group`` = the sample of each patch) or of
the whole batch (one group), the same math as the sparse norm on the dense-masked
map (biased variance, ``eps`` inside the square root, affine), optionally followed by
LeakyReLU. Saves only its input and per-group statistics; the normalized output is
recomputed in backward, so the packed tensors stay the only stored activations."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _group_mean(values: torch.Tensor, group: torch.Tensor, groups: int,
                count: torch.Tensor) -> torch.Tensor:
    """Per-group mean of per-patch sums ``values`` (N, C): (groups, C)."""
    total = values.new_zeros(groups, values.shape[1]).index_add_(0, group, values)
    return total / count[:, None]


class PackedNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                group: torch.Tensor, groups: int, eps: float, slope: float | None) -> torch.Tensor:
        N, C = x.shape[:2]
        xf = x.reshape(N, C, -1)
        acc = torch.promote_types(x.dtype, torch.float32)
        count = torch.bincount(group, minlength=groups).to(acc) * xf.shape[2]
        mean = _group_mean(xf.sum(-1, dtype=acc), group, groups, count)
        centered = (xf - mean[group].unsqueeze(-1).to(x.dtype)).square_()
        var = _group_mean(centered.sum(-1, dtype=acc), group, groups, count)
        del centered
        rstd = (var + eps).rsqrt()
        scale = weight.to(acc) * rstd[group]                        # (N, C)
        shift = bias.to(acc) - mean[group] * scale
        # Broadcast in x's own shape: the output must not be a view (the encoder adds
        # the residual into it in place).
        per_patch = (N, C) + (1,) * (x.dim() - 2)
        y = torch.addcmul(shift.view(per_patch).to(x.dtype), x, scale.view(per_patch).to(x.dtype))
        if slope is not None:
            F.leaky_relu_(y, slope)
        ctx.save_for_backward(x, weight, bias, group, mean, rstd, count)
        ctx.groups, ctx.slope = groups, slope
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Few full-size temporaries: the weight is constant per group, so
        # dx = w*rstd * (dy - mean(dy) - xhat*mean(dy*xhat)), built in xhat's storage.
        x, weight, bias, group, mean, rstd, count = ctx.saved_tensors
        N, C = x.shape[:2]
        xhat = x.reshape(N, C, -1) - mean[group].unsqueeze(-1).to(x.dtype)
        xhat.mul_(rstd[group].unsqueeze(-1).to(x.dtype))
        dy = grad.reshape(N, C, -1)
        if ctx.slope is not None:
            negative = torch.addcmul(bias[:, None], xhat, weight[:, None]) <= 0
            dy = dy.masked_fill(negative, 0).add_(dy.masked_fill(~negative, 0), alpha=ctx.slope)
            del negative
        sum_dy = dy.sum(-1)                                           # (N, C)
        sum_dyx = (dy * xhat).sum(-1)
        dweight = sum_dyx.sum(0) if ctx.needs_input_grad[1] else None
        dbias = sum_dy.sum(0) if ctx.needs_input_grad[2] else None
        dx = None
        if ctx.needs_input_grad[0]:
            mean_dy = _group_mean(sum_dy, group, ctx.groups, count)[group].unsqueeze(-1)
            mean_dyx = _group_mean(sum_dyx, group, ctx.groups, count)[group].unsqueeze(-1)
            coef = (weight * rstd)[group].unsqueeze(-1)
            dx = xhat.mul_(-mean_dyx.to(x.dtype)).add_(dy).sub_(mean_dy.to(x.dtype))
            dx = dx.mul_(coef.to(x.dtype)).view(x.shape)
        return dx, dweight, dbias, None, None, None, None


def packed_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, group: torch.Tensor,
                groups: int, *, eps: float = 1e-5, slope: float | None = None) -> torch.Tensor:
    """Normalizes packed ``x`` (N, C, ...) per channel over the patches of each of
    ``groups`` groups (``group`` (N,) int64), affine ``weight``/``bias`` (C,), then
    LeakyReLU with ``slope`` unless it is None."""
    return PackedNorm.apply(x.contiguous(), weight, bias, group, groups, eps, slope)

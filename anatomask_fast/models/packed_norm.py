"""Instance normalization of packed patches (N, C, q, q, q): statistics per channel
over the visible voxels of each sample (``group`` = the sample of each patch) or of
the whole batch (one group), the same math as the sparse norm on the dense-masked
map (biased variance, ``eps`` inside the square root, affine), optionally followed by
LeakyReLU. Saves only its input and per-group statistics; the normalized output is
recomputed in backward, so the packed tensors stay the only stored activations.

The statistics, the normalization and the backward are also used by the fused
norm -> LeakyReLU -> conv of :mod:`anatomask_fast.models.packed_conv`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _group_mean(
    values: torch.Tensor, group: torch.Tensor, groups: int, count: torch.Tensor
) -> torch.Tensor:
    """Per-group mean of per-patch sums ``values`` (N, C): (groups, C). A one-hot matmul:
    CPU index_add_ serializes on repeated indices (tens of ms for a few KB here)."""
    members = F.one_hot(group, groups).to(values.dtype)  # (N, groups)
    return (members.T @ values) / count[:, None]


def _rows(per_group: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """(groups, C) -> (N, C), the row of each patch's group. index_select: CPU advanced
    indexing with repeated indices takes milliseconds even for a few KB."""
    return per_group.index_select(0, group)


def _per_patch(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N, C) -> (N, C, 1, 1, 1) in ``like``'s dtype, broadcastable against ``like``."""
    return t.to(like.dtype).view(t.shape + (1,) * (like.dim() - 2))


@dataclass(frozen=True)
class NormStats:
    """Per-group statistics of one packed norm (accumulation dtype)."""

    group: torch.Tensor  # (N,) int64 group of each patch
    groups: int
    mean: torch.Tensor  # (groups, C)
    rstd: torch.Tensor  # (groups, C)
    count: torch.Tensor  # (groups,) voxels per group

    @classmethod
    def of(cls, x: torch.Tensor, group: torch.Tensor, groups: int, eps: float) -> NormStats:
        N, C = x.shape[:2]
        xf = x.reshape(N, C, -1)
        acc = torch.promote_types(x.dtype, torch.float32)
        count = torch.bincount(group, minlength=groups).to(acc) * xf.shape[2]
        mean = _group_mean(xf.sum(-1, dtype=acc), group, groups, count)
        centered = (xf - _rows(mean, group).unsqueeze(-1).to(x.dtype)).square_()
        var = _group_mean(centered.sum(-1, dtype=acc), group, groups, count)
        del centered
        return cls(group, groups, mean, (var + eps).rsqrt(), count)

    def normalize(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, slope: float | None
    ) -> torch.Tensor:
        """``act(weight * (x - mean) * rstd + bias)``, a new tensor in ``x``'s shape
        (not a view: the encoder adds the residual into it in place)."""
        scale = weight.to(self.mean.dtype) * _rows(self.rstd, self.group)  # (N, C)
        shift = bias.to(self.mean.dtype) - _rows(self.mean, self.group) * scale
        y = torch.addcmul(_per_patch(shift, x), x, _per_patch(scale, x))
        return F.leaky_relu_(y, slope) if slope is not None else y

    def backward(
        self,
        x: torch.Tensor,
        grad: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        slope: float | None,
        needs: tuple[bool, bool, bool],
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Gradients of ``normalize`` in (x, weight, bias). ``grad`` may be overwritten.
        Few full-size temporaries: the weight is constant per group, so
        dx = w*rstd * (dy - mean(dy) - xhat*mean(dy*xhat)), built in xhat's storage."""
        N, C = x.shape[:2]
        group = self.group
        xhat = x.reshape(N, C, -1) - _rows(self.mean, group).unsqueeze(-1).to(x.dtype)
        xhat.mul_(_rows(self.rstd, group).unsqueeze(-1).to(x.dtype))
        dy = grad.reshape(N, C, -1)
        if slope is not None:
            before = torch.addcmul(bias[:, None].to(x.dtype), xhat, weight[:, None].to(x.dtype))
            dy = torch.ops.aten.leaky_relu_backward(dy, before, slope, False)
            del before
        sum_dy = dy.sum(-1)  # (N, C)
        sum_dyx = (dy * xhat).sum(-1)
        dweight = sum_dyx.sum(0) if needs[1] else None
        dbias = sum_dy.sum(0) if needs[2] else None
        dx = None
        if needs[0]:
            mean_dy = _rows(_group_mean(sum_dy, group, self.groups, self.count), group).unsqueeze(
                -1
            )
            mean_dyx = _rows(_group_mean(sum_dyx, group, self.groups, self.count), group).unsqueeze(
                -1
            )
            coef = _rows(weight * self.rstd, group).unsqueeze(-1)
            dx = xhat.mul_(-mean_dyx.to(x.dtype)).add_(dy).sub_(mean_dy.to(x.dtype))
            dx = dx.mul_(coef.to(x.dtype)).view(x.shape)
        return dx, dweight, dbias

    def saved(self) -> tuple[torch.Tensor, ...]:
        return self.group, self.mean, self.rstd, self.count

    @classmethod
    def restore(cls, saved: tuple[torch.Tensor, ...], groups: int) -> NormStats:
        group, mean, rstd, count = saved
        return cls(group, groups, mean, rstd, count)


class PackedNorm(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        group: torch.Tensor,
        groups: int,
        eps: float,
        slope: float | None,
    ) -> torch.Tensor:
        stats = NormStats.of(x, group, groups, eps)
        ctx.save_for_backward(x, weight, bias, *stats.saved())
        ctx.groups, ctx.slope = groups, slope
        return stats.normalize(x, weight, bias, slope)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, bias, *saved = ctx.saved_tensors
        stats = NormStats.restore(tuple(saved), ctx.groups)
        dx, dweight, dbias = stats.backward(
            x, grad, weight, bias, ctx.slope, ctx.needs_input_grad[:3]
        )
        return dx, dweight, dbias, None, None, None, None


def packed_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    group: torch.Tensor,
    groups: int,
    *,
    eps: float = 1e-5,
    slope: float | None = None,
) -> torch.Tensor:
    """Normalizes packed ``x`` (N, C, ...) per channel over the patches of each of
    ``groups`` groups (``group`` (N,) int64), affine ``weight``/``bias`` (C,), then
    LeakyReLU with ``slope`` unless it is None."""
    return PackedNorm.apply(x.contiguous(), weight, bias, group, groups, eps, slope)

"""``conv3d(nearest_upsample(low, scale), weight, padding=kernel // 2)`` computed on
``low``, without the up-sampled map.

Along an axis up-sampled by ``s``, output voxel ``s * i + r`` (phase ``r``) sees through
tap ``t`` the low-resolution voxel ``i + floor((r + t - k // 2) / s)``: each phase is a
convolution of ``low`` with a smaller kernel whose taps are sums of the original's
(for s = 2, k = 3: taps (w0, w1 + w2) at offsets (-1, 0) and (w0 + w1, w2) at (0, 1)).
The ``prod(s)`` phase convolutions together do ``prod(sum_r L_r) / prod(s * k)`` of the
multiply-adds (8 / 27 for 2x2x2 and 3x3x3), keep ``low`` only for backward (nothing to
recompute), and give the same numbers up to the rounding of the tap sums.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .amp import accumulate_fp32


@dataclass(frozen=True)
class _AxisPhase:
    start: int  # first input index of this phase's slice of the padded map
    taps: torch.Tensor  # (L, k) 0/1: which original taps sum into each of L taps


def _axis_phases(scale: int, kernel: int) -> tuple[list[_AxisPhase], tuple[int, int]]:
    """Each phase of one axis, and the zero padding of ``low`` (before, after) they need."""
    offsets = [[(r + t - kernel // 2) // scale for t in range(kernel)] for r in range(scale)]
    before = max(0, -min(min(o) for o in offsets))
    after = max(0, max(max(o) for o in offsets))
    phases = []
    for per_tap in offsets:
        first = min(per_tap)
        taps = torch.zeros(max(per_tap) - first + 1, kernel, dtype=torch.float64)
        for t, o in enumerate(per_tap):
            taps[o - first, t] = 1
        phases.append(_AxisPhase(before + first, taps))
    return phases, (before, after)


def _phase_weight(weight: torch.Tensor, taps: tuple[torch.Tensor, ...]) -> torch.Tensor:
    d, h, w = (t.to(weight) for t in taps)  # dtype and device
    return torch.einsum("it,ju,lv,octuv->ocijl", d, h, w, weight)


def _weight_grad(grad: torch.Tensor, taps: tuple[torch.Tensor, ...]) -> torch.Tensor:
    d, h, w = (t.to(grad) for t in taps)
    return torch.einsum("it,ju,lv,ocijl->octuv", d, h, w, grad)


def nearest(z: torch.Tensor, scale: tuple[int, int, int]) -> torch.Tensor:
    """Nearest up-sampling by ``scale`` (``z`` itself for (1, 1, 1))."""
    if tuple(scale) == (1, 1, 1):
        return z
    return F.interpolate(z, scale_factor=scale, mode="nearest")


class _UpsampledConv(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, low: torch.Tensor, weight: torch.Tensor, scale: tuple[int, int, int]
    ) -> torch.Tensor:
        per_axis = [_axis_phases(s, k) for s, k in zip(scale, weight.shape[2:])]
        padding = [p for _, pad in reversed(per_axis) for p in pad]  # F.pad: last axis first
        sizes = low.shape[2:]
        padded = F.pad(low, padding)
        out = None
        for index, phases in _each_phase(per_axis):
            taps = tuple(p.taps for p in phases)
            part = F.conv3d(_slice(padded, phases, sizes), _phase_weight(weight, taps))
            if out is None:  # the convolution's dtype (autocast's, when it is on)
                out = part.new_empty((*part.shape[:2], *(n * s for n, s in zip(sizes, scale))))
            _phase_view(out, scale)[index] = part
        ctx.scale, ctx.per_axis, ctx.padding = scale, per_axis, padding
        ctx.save_for_backward(low, weight)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        low, weight = ctx.saved_tensors
        sizes = low.shape[2:]
        # The forward's convolutions ran in grad's dtype (autocast): their backward too.
        padded = F.pad(low.to(grad.dtype), ctx.padding)
        grad_padded = (
            torch.zeros(
                padded.shape,
                dtype=torch.promote_types(grad.dtype, torch.float32),
                device=grad.device,
            )
            if low.requires_grad
            else None
        )
        grad_weight = None
        phase_grads = _phase_view(grad, ctx.scale)
        for index, phases in _each_phase(ctx.per_axis):
            taps = tuple(p.taps for p in phases)
            source = _slice(padded, phases, sizes)
            grad_in, grad_w, _ = torch.ops.aten.convolution_backward(
                phase_grads[index].contiguous(),
                source,
                _phase_weight(weight, taps).to(grad.dtype),
                None,
                [1, 1, 1],
                [0, 0, 0],
                [1, 1, 1],
                False,
                [0, 0, 0],
                1,
                [grad_padded is not None, True, False],
            )
            if grad_padded is not None:
                _slice(grad_padded, phases, sizes).add_(grad_in)
            grad_w = grad_w.to(torch.promote_types(grad_w.dtype, torch.float32))
            grad_weight = accumulate_fp32(grad_weight, _weight_grad(grad_w, taps))
        grad_low = None
        if grad_padded is not None:
            before = [pad[0] for _, pad in ctx.per_axis]
            grad_low = grad_padded[(..., *(slice(b, b + n) for b, n in zip(before, sizes)))]
            grad_low = grad_low.to(low.dtype)
        return grad_low, grad_weight.to(weight.dtype), None


def _each_phase(per_axis):
    """(index into the phase view, the three axis phases) for every phase."""
    for rd, rh, rw in itertools.product(*(range(len(phases)) for phases, _ in per_axis)):
        yield (
            (slice(None), slice(None), slice(None), rd, slice(None), rh, slice(None), rw),
            (per_axis[0][0][rd], per_axis[1][0][rh], per_axis[2][0][rw]),
        )


def _phase_view(full: torch.Tensor, scale: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, D*sd, H*sh, W*sw) as (B, C, D, sd, H, sh, W, sw)."""
    b, c, *sizes = full.shape
    split = [v for n, s in zip(sizes, scale) for v in (n // s, s)]
    return full.view(b, c, *split)


def _slice(padded: torch.Tensor, phases, sizes) -> torch.Tensor:
    """The part of the padded map that one phase's convolution reads."""
    return padded[
        (..., *(slice(p.start, p.start + n + p.taps.shape[0] - 1) for p, n in zip(phases, sizes)))
    ]


def upsampled_conv(
    low: torch.Tensor, weight: torch.Tensor, scale: tuple[int, int, int]
) -> torch.Tensor:
    """``F.conv3d(F.interpolate(low, scale_factor=scale, mode="nearest"), weight,
    padding=[k // 2 for k in kernel])`` (no bias), computed on ``low`` (odd kernels; an
    even one, which STU-Net never uses, takes the plain path)."""
    if any(k % 2 == 0 for k in weight.shape[2:]):
        return F.conv3d(nearest(low, scale), weight, padding=[k // 2 for k in weight.shape[2:]])
    if weight.shape[2:] == (1, 1, 1):  # a pointwise convolution commutes with the up-sampling
        return nearest(F.conv3d(low, weight), scale)
    return _UpsampledConv.apply(low, weight, tuple(scale))

"""``conv3d(conv_transpose3d(s, up_weight, up_bias, stride=2, padding=1), weight, bias,
padding=1)`` (the decoder's up-sampling, kernel 4, then its first 3x3x3 convolution)
computed on ``s``, without the up-sampled map and without the transposed
convolution's multiply-adds.

Along an axis, output voxel ``2o + r`` (phase ``r``) sees through conv tap ``a`` the
up-sampled voxel ``2o + r + a - 1``, which the transposed convolution builds from
``s[o + e]`` through its tap ``t = r + a - 2e`` (e in -1, 0, 1). So each of the 8
phases is a 3x3x3 convolution of ``s`` (padding 1) whose kernel is a sum of products
of the two kernels over the up-sampled channels (``phase_weights``): 8 convolutions at
the low resolution do the multiply-adds of the 3x3x3 convolution alone. The up-sampled
bias, seen through every tap, is a constant per output channel.

That sum also counts the taps that read the up-sampled map one voxel outside the
volume, where the convolution's zero padding reads zero. Those are subtracted on the
six border planes: for axis k, the taps outside along k (and inside along the axes
before k, so that each is subtracted once), a 2-D transposed convolution of the
border plane of ``s`` and a 2-D convolution, both thin.

Backward keeps ``s`` only (nothing is recomputed at full resolution): per phase the
input and kernel gradients of one low-resolution convolution; the kernels' and the
border planes' gradients reach the two weights and the bias through autograd on
those small tensors. Same numbers as the two modules up to rounding.
"""

from __future__ import annotations

import functools
import itertools

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .amp import AutocastState, memory_format_of

# (r0, r1, r2), in the order of phase_weights' first dimension.
PHASES = [(r0, r1, r2) for r0 in (0, 1) for r1 in (0, 1) for r2 in (0, 1)]


@functools.cache
def _pair_targets() -> tuple[int, ...]:
    """For each (a, t) pair of 3-D taps (conv tap a0 a1 a2, transposed-conv tap t0 t1 t2,
    flattened a-major, then t), the (phase, low-resolution tap) it sums into (r0 r1 r2, e0 e1 e2
    flattened r-major). Per axis, conv tap ``a`` of phase ``r`` reads ``s[o + e]``
    through tap ``t = r + a - 2e`` of the transposed convolution: every one of the 3 x 4
    pairs belongs to exactly one (r, e)."""
    per_axis = {}
    for a in range(3):
        for t in range(4):
            r = (t - a) % 2
            per_axis[a, t] = (r, (r + a - t) // 2 + 1)
    targets = []
    for a in itertools.product(range(3), repeat=3):
        for t in itertools.product(range(4), repeat=3):
            (r0, e0), (r1, e1), (r2, e2) = (per_axis[a[k], t[k]] for k in range(3))
            targets.append(((r0 * 2 + r1) * 2 + r2) * 27 + (e0 * 3 + e1) * 3 + e2)
    return tuple(targets)


def phase_weights(weight: torch.Tensor, up_weight: torch.Tensor) -> torch.Tensor:
    """The 8 phases' kernels (8, out, in, 3, 3, 3) of ``weight`` (out, mid, 3, 3, 3)
    after ``up_weight`` (in, mid, 4, 4, 4): the products over ``mid`` of every tap pair,
    summed into their phase and tap. One conv tap at a time, so that no intermediate
    (nor, under autograd, its gradient) holds all 1728 pairs. In fp32 or wider (autocast
    off): autocast casts the kernels for the convolutions."""
    out, mid = weight.shape[:2]
    inp = up_weight.shape[0]
    with torch.autocast(weight.device.type, enabled=False):
        up = up_weight.permute(1, 2, 3, 4, 0).reshape(mid, 64 * inp)
        taps = weight.reshape(out, mid, 27)
        index = torch.tensor(_pair_targets(), device=weight.device).view(27, 64)
        kernels = torch.zeros(
            8 * 27,
            out * inp,
            dtype=torch.promote_types(weight.dtype, up_weight.dtype),
            device=weight.device,
        )
        for a in range(27):
            # (out, t, in) -> (t, out * in): one row per pair (a, t)
            pairs = (taps[:, :, a] @ up).view(out, 64, inp).transpose(0, 1).reshape(64, -1)
            kernels.index_add_(0, index[a], pairs)
    return kernels.view(8, 27, out, inp).permute(0, 2, 3, 1).reshape(8, out, inp, 3, 3, 3)


def _constant(
    weight: torch.Tensor, up_bias: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor | None:
    """The up-sampled bias seen through every tap, plus the convolution's bias."""
    total = None if up_bias is None else weight.sum((2, 3, 4)) @ up_bias
    if bias is not None:
        total = bias if total is None else total + bias
    return total


# The six border planes, axis by axis, low side then high side.
BORDERS = [(axis, side) for axis in range(3) for side in (0, 1)]


def _border(t: torch.Tensor, axis: int, side: int) -> torch.Tensor:
    return t.select(2 + axis, 0 if side == 0 else t.shape[2 + axis] - 1)


def _border_terms(
    planes: list[torch.Tensor],
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    weight: torch.Tensor,
) -> list[torch.Tensor]:
    """For each of ``BORDERS`` (given ``s``'s border planes): the contribution of the
    taps that read the up-sampled map just outside the volume along the axis (and
    inside along the axes before it, so that each tap counts once), which the phase
    convolutions count and the convolution's zero padding does not."""
    terms = []
    for (axis, side), plane in zip(BORDERS, planes):
        # Axes before: inside only (zero padding); after: the one-voxel shell included.
        padding = tuple(1 if other < axis else 0 for other in range(3) if other != axis)
        up = F.conv_transpose2d(
            plane, up_weight.select(2 + axis, 3 * side), up_bias, stride=2, padding=padding
        )
        terms.append(F.conv2d(up, weight.select(2 + axis, 2 * side), padding=padding))
    return terms


def _phase_view(full: torch.Tensor) -> torch.Tensor:
    """(B, C, 2D, 2H, 2W) as (B, C, D, 2, H, 2, W, 2)."""
    b, c, d, h, w = full.shape
    return full.view(b, c, d // 2, 2, h // 2, 2, w // 2, 2)


def _phase(view: torch.Tensor, phase: tuple[int, int, int]) -> torch.Tensor:
    return view[:, :, :, phase[0], :, phase[1], :, phase[2]]


def composed(
    s: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``conv3d(conv_transpose3d(s, up_weight, up_bias, 2, 1), weight, bias, padding=1)``
    by the phase convolutions and the border corrections (no autograd)."""
    kernels = phase_weights(weight, up_weight)
    constant = _constant(weight, up_bias, bias)
    out = view = None
    for index, phase in enumerate(PHASES):
        part = F.conv3d(s, kernels[index], constant, padding=1)
        if out is None:  # the convolution's dtype (autocast's, when it is on)
            out = torch.empty(
                (*part.shape[:2], *(2 * n for n in s.shape[2:])),
                dtype=part.dtype,
                device=part.device,
                memory_format=memory_format_of(part),
            )
            view = _phase_view(out)
        _phase(view, phase).copy_(part)
        del part
    planes = [_border(s, axis, side) for axis, side in BORDERS]
    for (axis, side), term in zip(BORDERS, _border_terms(planes, up_weight, up_bias, weight)):
        _border(out, axis, side).sub_(term)
    return out


class ComposedGradients:
    """The gradients of :func:`composed` in its five inputs, from the output's gradient
    given slice by slice (samples x output channels): per phase the input and kernel
    gradients of one low-resolution convolution per slice; at the end the kernels',
    the border planes' and the constant's gradients reach the two weights, the biases
    and ``s``'s border planes through autograd on those small tensors. A caller that
    produces the output's gradient in slices never holds all of it."""

    def __init__(
        self,
        s: torch.Tensor,
        up_weight: torch.Tensor,
        up_bias: torch.Tensor | None,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        grad_dtype: torch.dtype,
        needs_s: bool,
        autocast: AutocastState,
    ) -> None:
        self.s, self.needs_s, self.autocast = s, needs_s, autocast
        # The kernels once, with autograd: their gradients reach the two weights.
        self.leaves = [
            t.detach().requires_grad_() if t is not None else None
            for t in (up_weight, up_bias, weight, bias)
        ]
        with torch.enable_grad():
            self.kernels = phase_weights(self.leaves[2], self.leaves[0])
        acc = torch.promote_types(grad_dtype, torch.float32)
        self.layout = memory_format_of(s)
        self.compute = s.to(grad_dtype)
        self.compute_kernels = self.kernels.detach().to(grad_dtype)
        self.grad_s = (
            torch.zeros(s.shape, dtype=acc, device=s.device).contiguous(memory_format=self.layout)
            if needs_s
            else None
        )
        self.grad_kernels = torch.zeros(self.kernels.shape, dtype=acc, device=s.device)
        self.grad_constant = torch.zeros(self.kernels.shape[1], dtype=acc, device=s.device)
        sizes = [2 * n for n in s.shape[2:]]
        self.grad_planes = [
            torch.zeros(
                s.shape[0],
                weight.shape[0],
                *(n for d, n in enumerate(sizes) if d != axis),
                dtype=acc,
                device=s.device,
            )
            for axis, _ in BORDERS
        ]

    def add(self, grad: torch.Tensor, samples: slice, channels: slice) -> None:
        """``grad``: the output's gradient at ``samples`` x ``channels``."""
        view = _phase_view(grad)
        for index, phase in enumerate(PHASES):
            g, gk, gc = torch.ops.aten.convolution_backward(
                _phase(view, phase).contiguous(memory_format=self.layout),
                self.compute[samples],
                self.compute_kernels[index, channels],
                [grad.shape[1]],
                [1] * 3,
                [1] * 3,
                [1] * 3,
                False,
                [0] * 3,
                1,
                [self.needs_s, True, True],
            )
            if self.needs_s:
                self.grad_s[samples].add_(g)
            self.grad_kernels[index, channels] += gk
            self.grad_constant[channels] += gc
            del g
        for plane, (axis, side) in zip(self.grad_planes, BORDERS):
            plane[samples, channels] = _border(grad, axis, side)

    def result(self) -> tuple[torch.Tensor | None, ...]:
        """(grad s, grad up_weight, grad up_bias, grad weight, grad bias)."""
        s, leaves = self.s, self.leaves
        planes = [
            _border(s, axis, side).detach().requires_grad_(self.needs_s) for axis, side in BORDERS
        ]
        with torch.enable_grad(), self.autocast.restored():
            terms = _border_terms(planes, leaves[0], leaves[1], leaves[2])
            constant = _constant(leaves[2], leaves[1], leaves[3])
        outputs = [self.kernels, *terms]
        grads = [
            self.grad_kernels.to(self.kernels.dtype),
            *(-g.to(term.dtype) for g, term in zip(self.grad_planes, terms)),
        ]
        if constant is not None:
            outputs.append(constant)
            grads.append(self.grad_constant.to(constant.dtype))
        wanted = [t for t in leaves if t is not None] + (planes if self.needs_s else [])
        found = iter(torch.autograd.grad(outputs, wanted, grads, allow_unused=True))
        up_w, up_b, w, b = (next(found) if t is not None else None for t in leaves)
        grad_s = self.grad_s
        if grad_s is not None:
            for (axis, side), g in zip(BORDERS, found):
                if g is not None:
                    _border(grad_s, axis, side).add_(g)
            grad_s = grad_s.to(s.dtype)
        return grad_s, up_w, up_b, w, b


class _TransposedUpConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, up_weight, up_bias, weight, bias):
        ctx.save_for_backward(s, up_weight, up_bias, weight, bias)
        ctx.autocast = AutocastState.current(s.device)
        return composed(s, up_weight, up_bias, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        s, up_weight, up_bias, weight, bias = ctx.saved_tensors
        gradients = ComposedGradients(
            s, up_weight, up_bias, weight, bias, grad.dtype, ctx.needs_input_grad[0], ctx.autocast
        )
        gradients.add(grad, slice(None), slice(None))
        return gradients.result()


# The composition runs where its intermediates (a product per pair of taps and of
# channels) are at most this share of the up-sampled map it saves: STU-Net-B's 64-channel
# full-resolution level (0.2 at 64^3, batch 2). At 128 channels (0.8 and more) they cost
# more time and memory than the up-sampling (measured on CPU).
MAX_PAIRS_TO_MAP = 0.25
# ... and where the level is at least this wide: below, oneDNN runs the eight narrow
# phase convolutions slowly (CPU, 1x64^3 B2 step: STU-Net-tiny's 16-channel level 3.9 s
# composed vs 2.2 s plain). STU-Net-B's 64-channel level: the same time either way, the
# composed block's memory saved; ResEnc-L's 32-channel level: library step 33.5 s
# composed vs 45.4 s plain (one alternating step each, machine under load).
MIN_CHANNELS = 32


def pays(s: torch.Tensor, up_sample: nn.ConvTranspose3d, conv: nn.Conv3d) -> bool:
    """Whether the composition is worth it for input ``s`` (and covers this geometry:
    the published decoder's)."""
    geometry = (
        up_sample.kernel_size == (4,) * 3
        and up_sample.stride == (2,) * 3
        and up_sample.padding == (1,) * 3
        and up_sample.output_padding == (0,) * 3
        and up_sample.dilation == (1,) * 3
        and up_sample.groups == 1
        and conv.kernel_size == (3,) * 3
        and conv.stride == (1,) * 3
        and conv.padding == (1,) * 3
        and conv.dilation == (1,) * 3
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )
    pairs = conv.out_channels * up_sample.in_channels * 27 * 64
    up_sampled = s.numel() // s.shape[1] * 8 * up_sample.out_channels
    wide = up_sample.in_channels >= MIN_CHANNELS
    return geometry and wide and pairs <= MAX_PAIRS_TO_MAP * up_sampled


def transposed_up_conv(
    s: torch.Tensor, up_sample: nn.ConvTranspose3d, conv: nn.Conv3d
) -> torch.Tensor:
    """``conv(up_sample(s))`` for the decoder's kernel-4, stride-2 up-sampling and a
    3x3x3 convolution (see the module's docstring)."""
    return _TransposedUpConv.apply(s, up_sample.weight, up_sample.bias, conv.weight, conv.bias)

"""The light U-Net decoder of SparK/AnatoMask pretraining, with a memory-lean
execution that computes the same numbers while storing less for backward.

Structure (parameter names as the reference, so state_dicts move between both): per
level ``dec.{i}``: ``up_sample`` (ConvTranspose3d k4 s2 p1; along an axis an encoder
does not stride, as some nnU-Net plans' stages, k3 s1 p1) then ``conv`` = [conv3
(no bias), BatchNorm3d, ReLU6, conv3 (no bias), BatchNorm3d]; widths halve per level
from ``width``; ``proj`` is a 1x1x1 conv to the image channels.

Memory-lean execution (training mode), per level with input ``s``:
- ``up_sample`` and the following conv run as one autograd function that stores the
  level's input only: at the large levels the composition of the two kernels
  (:mod:`~anatomask_fast.models.transposed_up_conv`: no up-sampled map, none of the
  transposed convolution's multiply-adds; the EMA teacher's pass uses it too), else
  the pair, recomputing the up-sampled map in backward (~8/27 of that conv).
- BatchNorm -> ReLU6 -> conv, and the last BatchNorm -> ``proj``, run as one autograd
  function that stores only the BatchNorm input and recomputes the normalized,
  activated map in backward (element-wise work).
The lean path runs only where it computes what the plain modules would: the block in
training mode with its BatchNorms in training mode (batch statistics) and gradients
enabled, and only where a sample's maps are not small next to the level's weights.
Otherwise (the EMA teacher in eval mode: running statistics, not updated; a
BatchNorm put in eval mode on its own; the 512-channel level) the plain modules run.
What stays stored per level: ``s``, and the outputs of the two 3x3x3 convs. Forward and
backward run one sample at a time (the fused BatchNorm backward one group of input
channels of a sample at a time), so the full-resolution intermediates, their
gradients and the convolutions' temporaries exist for one slice at once. Peak memory
of a CPU pretraining step (STU-Net-B, 1x64^3, B=2) is set by these slices.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from . import transposed_up_conv
from .amp import AutocastState, accumulate_fp32, memory_format_of

_DIMS = (0, 2, 3, 4)


def _per_channel(t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, 1, 1, 1)


def _batch_statistics(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float,
    eps: float,
    sync: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, rstd, count) per channel as ``nn.BatchNorm3d`` in training mode computes
    them (biased variance for normalization, unbiased for the running estimate, which
    is updated; synchronized across processes like ``SyncBatchNorm`` when ``sync``)."""
    acc = torch.promote_types(x.dtype, torch.float32)  # fp32 statistics for fp16/bf16
    count = torch.tensor(float(x.numel() // x.shape[1]), device=x.device, dtype=acc)
    var, mean = (t.to(acc) for t in torch.var_mean(x, dim=_DIMS, correction=0))
    if sync:  # combine the processes' moments exactly, in float64
        moments = torch.stack(
            [mean * count, (var + mean * mean) * count, count.expand_as(mean)]
        ).double()
        dist.all_reduce(moments)
        count = moments[2, 0].to(acc)
        mean = (moments[0] / moments[2]).to(acc)
        var = (moments[1] / moments[2] - (moments[0] / moments[2]) ** 2).clamp_min(0).to(acc)
    if running_mean is not None:
        running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        running_var.mul_(1 - momentum).add_(var * count / (count - 1).clamp_min(1), alpha=momentum)
    return mean, torch.rsqrt(var + eps), count


def _normalize_act_conv(
    x, mean, rstd, bn_weight, bn_bias, relu6, conv_weight, conv_bias, padding
) -> torch.Tensor:
    """conv(act(batch_norm(x))), one sample at a time."""
    return _per_sample(
        lambda n: F.conv3d(
            _normalize_act(x[n : n + 1], mean, rstd, bn_weight, bn_bias, relu6),
            conv_weight,
            conv_bias,
            padding=padding,
        ),
        x.shape[0],
    )


def _slice_gradients(
    x,
    grad_out,
    mean,
    rstd,
    weight,
    bias,
    relu6,
    conv_weight,
    padding,
    grad_conv_weight: torch.Tensor | None,
):
    """The gradient ``g`` at the BatchNorm's output (the activation's derivative applied)
    one sample and one group of input channels at a time: yields (sample index, channel
    slice, g, the slice of x, a free buffer of its size). The activated map, ``g`` and
    the convolution's temporaries exist for one slice only. Input channels split
    exactly: each channel's gradient and weight gradient are sums over the output
    channels only; the weight's gradient is added to ``grad_conv_weight`` when given.
    The forward's conv ran in grad_out's dtype (autocast's, under autocast): so does
    its backward."""
    compute_weight = conv_weight.to(grad_out.dtype)
    for n in range(x.shape[0]):
        for ch in _channel_groups(x[:1]):
            sample = x[n : n + 1, ch]
            y = _normalize_act(sample, mean[ch], rstd[ch], weight[ch], bias[ch], relu6)
            g, gw, _ = torch.ops.aten.convolution_backward(
                grad_out[n : n + 1],
                y.to(grad_out.dtype),
                compute_weight[:, ch],
                None,
                [1] * 3,
                list(padding),
                [1] * 3,
                False,
                [0] * 3,
                1,
                [True, grad_conv_weight is not None, False],
            )
            if grad_conv_weight is not None:
                grad_conv_weight[:, ch] += gw
            if relu6:
                # ReLU6's derivative, read off its output. A bool mask, not mul_ by one:
                # that would promote the mask to a float copy of the slice.
                g.masked_fill_(y.le(0).logical_or_(y.ge(6)), 0)
            yield n, ch, g, sample, y
            del y, g


def _coefficients(sum_g, sum_gx, mean, rstd, weight, count, sync):
    """d x = rstd * w * (g - mean(g) - xhat * mean(g * xhat)) (means over the batch) as
    ``a * g + b * x + c`` per channel (xhat is never materialized), from the
    per-channel sums of g and g * x; and the BatchNorm's weight and bias gradients."""
    grad_bias = sum_g
    grad_weight = (sum_gx - mean * grad_bias) * rstd  # sum(g * xhat)
    sums = torch.stack([grad_bias, grad_weight])
    if sync:
        dist.all_reduce(sums)
    mean_g, mean_gx = (sums / count).unbind(0)
    a = rstd * weight
    b = -a * rstd * mean_gx
    c = -a * mean_g - b * mean
    return a, b, c, grad_weight, grad_bias


class _BatchNormActConv(torch.autograd.Function):
    """conv(act(batch_norm(x))) storing x and the per-channel statistics only (batch
    statistics: :func:`_batch_statistics`)."""

    @staticmethod
    def forward(
        ctx,
        x,
        bn_weight,
        bn_bias,
        running_mean,
        running_var,
        momentum,
        eps,
        relu6,
        conv_weight,
        conv_bias,
        padding,
        sync,
    ):
        mean, rstd, count = _batch_statistics(x, running_mean, running_var, momentum, eps, sync)
        ctx.save_for_backward(x, mean, rstd, bn_weight, bn_bias, conv_weight, count)
        ctx.relu6, ctx.padding, ctx.sync = relu6, padding, sync
        ctx.has_conv_bias = conv_bias is not None
        return _normalize_act_conv(
            x, mean, rstd, bn_weight, bn_bias, relu6, conv_weight, conv_bias, padding
        )

    @staticmethod
    def backward(ctx, grad_out):
        x, mean, rstd, weight, bias, conv_weight, count = ctx.saved_tensors
        grad_out = grad_out.contiguous(memory_format=memory_format_of(x))
        # The gradient buffer is for the batch, and becomes d x in place.
        grad_y = torch.empty_like(x)
        grad_conv_weight = torch.zeros_like(
            conv_weight, dtype=torch.promote_types(grad_out.dtype, torch.float32)
        )
        # Per channel, sums of g and of g * x, taken slice by slice: a sum over the whole
        # half-precision gradient with an fp32 result would first copy it to fp32.
        sum_g, sum_gx = torch.zeros_like(mean), torch.zeros_like(mean)
        for n, ch, g, sample, y in _slice_gradients(
            x,
            grad_out,
            mean,
            rstd,
            weight,
            bias,
            ctx.relu6,
            conv_weight,
            ctx.padding,
            grad_conv_weight,
        ):
            grad_y[n : n + 1, ch] = g
            sum_g[ch] += g.sum(_DIMS, dtype=sum_g.dtype)
            sum_gx[ch] += y.copy_(sample).mul_(g).sum(_DIMS, dtype=sum_gx.dtype)  # y's buffer
        del g, sample, y  # the last slice's: not alive beside the whole gradient
        grad_conv_weight = grad_conv_weight.to(conv_weight.dtype)
        grad_conv_bias = grad_out.sum(_DIMS, dtype=conv_weight.dtype) if ctx.has_conv_bias else None
        a, b, c, grad_weight, grad_bias = _coefficients(
            sum_g, sum_gx, mean, rstd, weight, count, ctx.sync
        )
        grad_x = grad_y.mul_(_per_channel(a.to(x.dtype))).add_(_per_channel(c.to(x.dtype)))
        grad_x.addcmul_(x, _per_channel(b.to(x.dtype)))
        return (
            grad_x,
            grad_weight.to(weight.dtype),
            grad_bias.to(bias.dtype),
            None,
            None,
            None,
            None,
            None,
            grad_conv_weight,
            grad_conv_bias,
            None,
            None,
        )


class _ComposedBlock(torch.autograd.Function):
    """conv2(relu6(batch_norm(conv1(up_sample(s))))) with up-sampling and conv1 composed
    (:mod:`~anatomask_fast.models.transposed_up_conv`), storing ``s`` and conv1's
    output ``c1`` only. Backward never holds the gradient of ``c1`` for the batch: a
    first pass over (sample, channel group) slices takes the BatchNorm's sums and conv2's
    weight gradient, a second recomputes each slice's gradient (conv2's input gradient
    once more), turns it into ``c1``'s and hands it to the composition's gradients at
    once. At the full-resolution level this removes the largest tensor of a step's
    peak (``c1``'s gradient, as large as ``c1``) for one more input-gradient pass of
    conv2."""

    @staticmethod
    def forward(
        ctx,
        s,
        up_weight,
        up_bias,
        conv1_weight,
        conv1_bias,
        bn_weight,
        bn_bias,
        running_mean,
        running_var,
        momentum,
        eps,
        conv2_weight,
        padding,
        sync,
    ):
        c1 = transposed_up_conv.composed(s, up_weight, up_bias, conv1_weight, conv1_bias)
        mean, rstd, count = _batch_statistics(c1, running_mean, running_var, momentum, eps, sync)
        ctx.save_for_backward(
            s,
            up_weight,
            up_bias,
            conv1_weight,
            conv1_bias,
            c1,
            mean,
            rstd,
            bn_weight,
            bn_bias,
            conv2_weight,
            count,
        )
        ctx.padding, ctx.sync = padding, sync
        ctx.autocast = AutocastState.current(s.device)
        return _normalize_act_conv(
            c1, mean, rstd, bn_weight, bn_bias, True, conv2_weight, None, padding
        )

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (
            s,
            up_weight,
            up_bias,
            conv1_weight,
            conv1_bias,
            c1,
            mean,
            rstd,
            weight,
            bias,
            conv2_weight,
            count,
        ) = ctx.saved_tensors
        grad_out = grad_out.contiguous(memory_format=memory_format_of(c1))
        slices = functools.partial(
            _slice_gradients,
            c1,
            grad_out,
            mean,
            rstd,
            weight,
            bias,
            True,
            conv2_weight,
            ctx.padding,
        )
        grad_conv2_weight = torch.zeros_like(
            conv2_weight, dtype=torch.promote_types(grad_out.dtype, torch.float32)
        )
        sum_g, sum_gx = torch.zeros_like(mean), torch.zeros_like(mean)
        for _, ch, g, sample, y in slices(grad_conv2_weight):
            sum_g[ch] += g.sum(_DIMS, dtype=sum_g.dtype)
            sum_gx[ch] += y.copy_(sample).mul_(g).sum(_DIMS, dtype=sum_gx.dtype)
        del g, sample, y  # the last slice's
        a, b, c, grad_weight, grad_bias = (
            t.to(c1.dtype) if i < 3 else t
            for i, t in enumerate(_coefficients(sum_g, sum_gx, mean, rstd, weight, count, ctx.sync))
        )
        gradients = transposed_up_conv.ComposedGradients(
            s,
            up_weight,
            up_bias,
            conv1_weight,
            conv1_bias,
            c1.dtype,
            ctx.needs_input_grad[0],
            ctx.autocast,
        )
        for n, ch, g, sample, _ in slices(None):
            g.mul_(_per_channel(a[ch])).add_(_per_channel(c[ch])).addcmul_(
                sample, _per_channel(b[ch])
            )
            gradients.add(g, slice(n, n + 1), ch)
        del g, sample
        grad_s, up_w, up_b, w1, b1 = gradients.result()
        return (
            grad_s,
            up_w,
            up_b,
            w1,
            b1,
            grad_weight.to(weight.dtype),
            grad_bias.to(bias.dtype),
            None,
            None,
            None,
            None,
            grad_conv2_weight.to(conv2_weight.dtype),
            None,
            None,
        )


def composed_block(x: torch.Tensor, level: UNetBlock) -> torch.Tensor:
    """``level.conv[:4](level.up_sample(x))`` in training mode (see :class:`_ComposedBlock`)."""
    conv1, bn, _, conv2, _ = level.conv
    sync = _synchronized(bn)
    if bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
    return _ComposedBlock.apply(
        x,
        level.up_sample.weight,
        level.up_sample.bias,
        conv1.weight,
        conv1.bias,
        bn.weight,
        bn.bias,
        bn.running_mean,
        bn.running_var,
        bn.momentum,
        bn.eps,
        conv2.weight,
        conv2.padding,
        sync,
    )


def _per_sample(run: Callable[[int], torch.Tensor], batch: int) -> torch.Tensor:
    """The batch of ``run(n)`` (each a batch of one), computed one sample at a time: a
    forward's full-resolution intermediate (up-sampled or activated map) exists for one
    sample at once."""
    out = None
    for n in range(batch):
        sample = run(n)
        if out is None:
            out = torch.empty(
                (batch, *sample.shape[1:]),
                dtype=sample.dtype,
                device=sample.device,
                memory_format=memory_format_of(sample),
            )
        out[n : n + 1] = sample
        del sample
    return out


# The largest slice of a sample the fused BatchNorm backward activates at once (CPU:
# the full-resolution level of STU-Net-B at 64^3 is 64 MiB a sample; on an H200 the
# whole STU-Net-B fp32 step at 1x112x112x128, B=4, takes 314 ms and 7.81 GiB with it;
# `benchmarks.training_memory --decoder-slice-mib` compares others), and the fewest
# channels a slice has (narrower convolutions lose efficiency).
SLICE_BYTES = 16 * 2**20
_MIN_SLICE_CHANNELS = 16


def _channel_groups(sample: torch.Tensor) -> list[slice]:
    channels = sample.shape[1]
    groups = -(-sample.numel() * sample.element_size() // SLICE_BYTES)
    groups = max(1, min(groups, channels // _MIN_SLICE_CHANNELS))
    step = -(-channels // groups)
    return [slice(c, min(c + step, channels)) for c in range(0, channels, step)]


def _normalize_act(x, mean, rstd, weight, bias, relu6: bool) -> torch.Tensor:
    scale = rstd * weight
    # add_ in place: x * scale + shift would allocate the map twice
    y = (x * _per_channel(scale.to(x.dtype))).add_(_per_channel((bias - mean * scale).to(x.dtype)))
    return y.clamp_(0, 6) if relu6 else y


def _synchronized(bn: nn.Module) -> bool:
    return (
        isinstance(bn, nn.SyncBatchNorm)
        and dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size() > 1
    )


def batch_norm_act_conv(
    x: torch.Tensor, bn: nn.BatchNorm3d, relu6: bool, conv: nn.Conv3d
) -> torch.Tensor:
    """``conv(relu6?(bn(x)))`` in training mode, storing only ``x`` for backward."""
    sync = _synchronized(bn)
    if bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
    return _BatchNormActConv.apply(
        x,
        bn.weight,
        bn.bias,
        bn.running_mean,
        bn.running_var,
        bn.momentum,
        bn.eps,
        relu6,
        conv.weight,
        conv.bias,
        conv.padding,
        sync,
    )


class _UpsampleConv(torch.autograd.Function):
    """``conv(up_sample(s))`` (a stride-2 transposed conv, then a 3x3x3 conv without
    bias) storing only ``s``. Backward runs one sample at a time: it recomputes the
    sample's up-sampled map (in the forward's precision) and takes both convolutions'
    gradients, so the full-resolution map, its gradient and the convolutions' layout
    copies exist for one sample at a time, not for the batch."""

    @staticmethod
    def forward(ctx, s, up_weight, up_bias, weight, up_stride, up_padding, padding):
        ctx.save_for_backward(s, up_weight, up_bias, weight)
        ctx.geometry = (up_stride, up_padding, padding)
        ctx.autocast = AutocastState.current(s.device)
        return _per_sample(
            lambda n: F.conv3d(
                F.conv_transpose3d(
                    s[n : n + 1], up_weight, up_bias, stride=up_stride, padding=up_padding
                ),
                weight,
                None,
                padding=padding,
            ),
            s.shape[0],
        )

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        s, up_weight, up_bias, weight = ctx.saved_tensors
        up_stride, up_padding, padding = ctx.geometry
        grad_s = torch.empty_like(s) if ctx.needs_input_grad[0] else None
        sums: list[torch.Tensor | None] = [None, None, None]  # up_weight, up_bias, weight
        compute_weight, compute_up_weight = weight.to(grad.dtype), up_weight.to(grad.dtype)
        for n in range(s.shape[0]):
            sample = s[n : n + 1]
            with ctx.autocast.restored():
                up = F.conv_transpose3d(
                    sample, up_weight, up_bias, stride=up_stride, padding=up_padding
                )
            grad_up, grad_weight, _ = torch.ops.aten.convolution_backward(
                grad[n : n + 1].contiguous(memory_format=memory_format_of(up)),
                up.to(grad.dtype),
                compute_weight,
                None,
                [1] * 3,
                list(padding),
                [1] * 3,
                False,
                [0] * 3,
                1,
                [True, True, False],
            )
            del up
            grad_sample, grad_up_weight, grad_up_bias = torch.ops.aten.convolution_backward(
                grad_up,
                sample.to(grad.dtype),
                compute_up_weight,
                [up_weight.shape[1]],
                list(up_stride),
                list(up_padding),
                [1] * 3,
                True,
                [0] * 3,
                1,
                [grad_s is not None, True, True],
            )
            del grad_up
            if grad_s is not None:
                grad_s[n : n + 1] = grad_sample
            for i, g in enumerate((grad_up_weight, grad_up_bias, grad_weight)):
                sums[i] = accumulate_fp32(sums[i], g)
        up_w, up_b, w = (t.to(p.dtype) for t, p in zip(sums, (up_weight, up_bias, weight)))
        return grad_s, up_w, up_b, w, None, None, None


def up_sample_conv(s: torch.Tensor, up_sample: nn.ConvTranspose3d, conv: nn.Conv3d) -> torch.Tensor:
    """``conv(up_sample(s))`` storing only ``s`` (see :class:`_UpsampleConv`)."""
    return _UpsampleConv.apply(
        s,
        up_sample.weight,
        up_sample.bias,
        conv.weight,
        up_sample.stride,
        up_sample.padding,
        conv.padding,
    )


# A level runs lean when one sample's up-sampled map has at least 1/8 of the elements
# of the level's weights (see UNetBlock.runs_lean).
_LEAN_MIN_MAP_TO_WEIGHTS = 8


def _up_kernel(stride: tuple[int, int, int]) -> tuple[int, int, int]:
    """The up-sampling kernel per axis: SparK's k4 s2 p1 doubles an axis, k3 s1 p1
    keeps one."""
    if any(s not in (1, 2) for s in stride):
        raise ValueError(f"LightDecoder: strides must be 1 or 2 per axis, got {stride}")
    return tuple(4 if s == 2 else 3 for s in stride)


class UNetBlock(nn.Module):
    def __init__(
        self, cin: int, cout: int, sync_bn: bool = False, stride: tuple[int, int, int] = (2, 2, 2)
    ) -> None:
        super().__init__()
        norm = nn.SyncBatchNorm if sync_bn else nn.BatchNorm3d
        self.up_sample = nn.ConvTranspose3d(
            cin, cin, kernel_size=_up_kernel(stride), stride=stride, padding=1, bias=True
        )
        self.conv = nn.Sequential(
            nn.Conv3d(cin, cin, 3, padding=1, bias=False),
            norm(cin),
            nn.ReLU6(inplace=True),
            nn.Conv3d(cin, cout, 3, padding=1, bias=False),
            norm(cout),
        )

    def runs_lean(self, lean: bool, x: torch.Tensor) -> bool:
        """Whether the lean path gives the plain modules' result (batch statistics), and
        is worth it for input ``x``: its per-sample passes handle every weight once per
        sample, so a level whose up-sampled map (per sample) is small next to its
        weights runs plain (STU-Net-B: the 512-channel level, whose maps are a few MiB
        and weights 110 MB)."""
        bn1, bn2 = self.conv[1], self.conv[4]
        weights = sum(m.weight.numel() for m in (self.up_sample, self.conv[0], self.conv[3]))
        up_sampled = x[0].numel() * 8
        return (
            lean
            and self.training
            and bn1.training
            and bn2.training
            and torch.is_grad_enabled()
            and up_sampled * _LEAN_MIN_MAP_TO_WEIGHTS >= weights
        )

    def lean_conv2(self, x: torch.Tensor) -> torch.Tensor:
        """``conv[:4](up_sample(x))`` in the lean path: where it pays the composed block
        (no up-sampled map, no batch-sized gradient of conv1's output), else the
        recomputing up-sampling and the fused BatchNorm + ReLU6 + conv."""
        if transposed_up_conv.pays(x, self.up_sample, self.conv[0]):
            return composed_block(x, self)
        c1 = up_sample_conv(x, self.up_sample, self.conv[0])
        return batch_norm_act_conv(c1, self.conv[1], True, self.conv[3])

    def forward(self, x: torch.Tensor, lean: bool = False) -> torch.Tensor:
        if self.runs_lean(lean, x):
            return self.conv[4](self.lean_conv2(x))
        if lean and transposed_up_conv.pays(x, self.up_sample, self.conv[0]):
            # The composition also where the lean path does not run (the EMA teacher's
            # eval-mode pass): the same numbers without the up-sampling's work.
            c1 = transposed_up_conv.transposed_up_conv(x, self.up_sample, self.conv[0])
        else:
            c1 = self.conv[0](self.up_sample(x))
        return self.conv[1:](c1)


class LightDecoder(nn.Module):
    """Reconstructs the image from the densified multi-scale features, deepest first;
    ``strides``: each level's up-sampling (default (2, 2, 2))."""

    def __init__(
        self,
        levels: int = 4,
        width: int = 512,
        out_channels: int = 1,
        sync_bn: bool = False,
        strides: Sequence[tuple[int, int, int]] | None = None,
    ) -> None:
        super().__init__()
        channels = [width // 2**i for i in range(levels + 1)]
        strides = [(2, 2, 2)] * levels if strides is None else list(strides)
        if len(strides) != levels:
            raise ValueError(
                f"LightDecoder: {levels} levels need {levels} strides, got {len(strides)}"
            )
        self.widths = channels
        self.dec = nn.ModuleList(
            UNetBlock(cin, cout, sync_bn, stride)
            for cin, cout, stride in zip(channels[:-1], channels[1:], strides)
        )
        self.proj = nn.Conv3d(channels[-1], out_channels, kernel_size=1, bias=True)
        self._initialize()

    def _initialize(self) -> None:
        """The published decoder's initialization: convolutions truncated-normal (std
        0.02), transposed convolutions Kaiming-normal (fan out, ReLU), biases zero,
        BatchNorm weight one and bias zero."""
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.trunc_normal_(m.weight, std=0.02)
            elif isinstance(m, nn.ConvTranspose3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight)
            else:
                continue
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, features: list[torch.Tensor | None], lean: bool = False) -> torch.Tensor:
        """``features[i]`` (decoder width ``widths[i]``) is added before level ``i``."""
        x: torch.Tensor | int = 0
        for i, level in enumerate(self.dec):
            if i < len(features) and features[i] is not None:
                x = features[i] + x  # in the feature's memory format
            if i == len(self.dec) - 1 and level.runs_lean(lean, x):
                return self._last_level_lean(level, x)
            x = level(x, lean)
        return self.proj(x)

    def _last_level_lean(self, level: UNetBlock, x: torch.Tensor) -> torch.Tensor:
        # As UNetBlock's lean path, with the last BatchNorm fused into `proj`.
        return batch_norm_act_conv(level.lean_conv2(x), level.conv[4], False, self.proj)

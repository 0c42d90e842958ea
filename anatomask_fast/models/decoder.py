"""The light U-Net decoder of SparK/AnatoMask pretraining, with a memory-lean
execution that computes the same numbers while storing less for backward.

Structure (parameter names as the reference, so state_dicts move between both): per
level ``dec.{i}``: ``up_sample`` (ConvTranspose3d k4 s2 p1) then ``conv`` = [conv3
(no bias), BatchNorm3d, ReLU6, conv3 (no bias), BatchNorm3d]; widths halve per level
from ``width``; ``proj`` is a 1x1x1 conv to the image channels.

Memory-lean execution (training mode), per level with input ``s``:
- ``up_sample`` is recomputed in backward instead of stored (selective checkpointing
  that keeps the output of the following conv), so the full-resolution up-sampled
  map is never stored; the recompute costs ~8/27 of that conv.
- BatchNorm -> ReLU6 -> conv, and the last BatchNorm -> ``proj``, run as one autograd
  function that stores only the BatchNorm input and recomputes the normalized,
  activated map in backward (element-wise work).
What stays stored per level: ``s``, and the outputs of the two 3x3x3 convs.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

_DIMS = (0, 2, 3, 4)


def _per_channel(t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, 1, 1, 1)


class _BatchNormActConv(torch.autograd.Function):
    """conv(act(batch_norm(x))) storing x and the per-channel statistics only.

    Batch statistics as ``nn.BatchNorm3d`` in training mode (biased variance for
    normalization, unbiased for the running estimate; synchronized across processes
    like ``SyncBatchNorm`` when ``sync``)."""

    @staticmethod
    def forward(ctx, x, bn_weight, bn_bias, running_mean, running_var, momentum, eps,
                relu6, conv_weight, conv_bias, padding, sync):
        acc = torch.promote_types(x.dtype, torch.float32)   # fp32 statistics for fp16/bf16
        count = torch.tensor(float(x.numel() // x.shape[1]), device=x.device, dtype=acc)
        var, mean = (t.to(acc) for t in torch.var_mean(x, dim=_DIMS, correction=0))
        if sync:  # combine the processes' moments exactly, in float64
            moments = torch.stack([mean * count, (var + mean * mean) * count,
                                   count.expand_as(mean)]).double()
            dist.all_reduce(moments)
            count = moments[2, 0].to(acc)
            mean = (moments[0] / moments[2]).to(acc)
            var = (moments[1] / moments[2] - (moments[0] / moments[2]) ** 2).clamp_min(0).to(acc)
        rstd = torch.rsqrt(var + eps)
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
            running_var.mul_(1 - momentum).add_(var * count / (count - 1).clamp_min(1),
                                                alpha=momentum)
        y = _normalize_act(x, mean, rstd, bn_weight, bn_bias, relu6)
        ctx.save_for_backward(x, mean, rstd, bn_weight, bn_bias, conv_weight, count)
        ctx.relu6, ctx.padding, ctx.sync = relu6, padding, sync
        ctx.has_conv_bias = conv_bias is not None
        return F.conv3d(y, conv_weight, conv_bias, padding=padding)

    @staticmethod
    def backward(ctx, grad_out):
        x, mean, rstd, weight, bias, conv_weight, count = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        # The forward's conv ran in grad_out's dtype (autocast's, under autocast).
        y = _normalize_act(x, mean, rstd, weight, bias, ctx.relu6).to(grad_out.dtype)
        compute_weight = conv_weight.to(grad_out.dtype)
        grad_y = torch.nn.grad.conv3d_input(y.shape, compute_weight, grad_out,
                                            padding=ctx.padding).to(x.dtype)
        grad_conv_weight = torch.nn.grad.conv3d_weight(y, conv_weight.shape, grad_out,
                                                       padding=ctx.padding).to(conv_weight.dtype)
        grad_conv_bias = grad_out.sum(_DIMS, dtype=conv_weight.dtype) if ctx.has_conv_bias \
            else None
        if ctx.relu6:
            grad_y.mul_((y > 0) & (y < 6))        # ReLU6's derivative, read off its output
        del y, compute_weight
        xhat = (x - _per_channel(mean.to(x.dtype))) * _per_channel(rstd.to(x.dtype))
        grad_bias = grad_y.sum(_DIMS, dtype=count.dtype)
        grad_weight = torch.einsum("ncdhw,ncdhw->c", grad_y, xhat).to(count.dtype)
        # d x = rstd * w * (g - mean(g) - xhat * mean(g * xhat)), means over the batch.
        sums = torch.stack([grad_bias, grad_weight])
        if ctx.sync:
            dist.all_reduce(sums)
        mean_g, mean_gx = (sums / count).unbind(0)
        grad_x = grad_y.sub_(_per_channel(mean_g)).sub_(xhat.mul_(_per_channel(mean_gx)))
        grad_x.mul_(_per_channel(rstd * weight))
        return (grad_x, grad_weight.to(weight.dtype), grad_bias.to(bias.dtype), None, None, None,
                None, None, grad_conv_weight, grad_conv_bias, None, None)


def _normalize_act(x, mean, rstd, weight, bias, relu6: bool) -> torch.Tensor:
    scale = rstd * weight
    y = x * _per_channel(scale.to(x.dtype)) + _per_channel((bias - mean * scale).to(x.dtype))
    return y.clamp_(0, 6) if relu6 else y


def batch_norm_act_conv(x: torch.Tensor, bn: nn.BatchNorm3d, relu6: bool,
                        conv: nn.Conv3d) -> torch.Tensor:
    """``conv(relu6?(bn(x)))`` in training mode, storing only ``x`` for backward."""
    sync = isinstance(bn, nn.SyncBatchNorm) and dist.is_available() and dist.is_initialized() \
        and dist.get_world_size() > 1
    if bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
    return _BatchNormActConv.apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                   bn.momentum, bn.eps, relu6, conv.weight, conv.bias,
                                   conv.padding, sync)


def _keep_non_transposed_convs(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Store convolution outputs; recompute transposed convolutions (the up-sampling)."""
    if op is torch.ops.aten.convolution.default and not args[6]:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


_RECOMPUTE_UPSAMPLING = functools.partial(create_selective_checkpoint_contexts,
                                          _keep_non_transposed_convs)


class UNetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, sync_bn: bool = False) -> None:
        super().__init__()
        norm = nn.SyncBatchNorm if sync_bn else nn.BatchNorm3d
        self.up_sample = nn.ConvTranspose3d(cin, cin, kernel_size=4, stride=2, padding=1, bias=True)
        self.conv = nn.Sequential(
            nn.Conv3d(cin, cin, 3, padding=1, bias=False), norm(cin), nn.ReLU6(inplace=True),
            nn.Conv3d(cin, cout, 3, padding=1, bias=False), norm(cout))

    def forward(self, x: torch.Tensor, lean: bool = False) -> torch.Tensor:
        if not (lean and self.training and torch.is_grad_enabled()):
            return self.conv(self.up_sample(x))
        conv1, bn1, _, conv2, bn2 = self.conv
        c1 = checkpoint(lambda s: conv1(self.up_sample(s)), x, use_reentrant=False,
                        context_fn=_RECOMPUTE_UPSAMPLING)
        return bn2(batch_norm_act_conv(c1, bn1, True, conv2))


class LightDecoder(nn.Module):
    """Reconstructs the image from the densified multi-scale features, deepest first."""

    def __init__(self, levels: int = 4, width: int = 512, out_channels: int = 1,
                 sync_bn: bool = False) -> None:
        super().__init__()
        channels = [width // 2 ** i for i in range(levels + 1)]
        self.widths = channels
        self.dec = nn.ModuleList(UNetBlock(cin, cout, sync_bn)
                                 for cin, cout in zip(channels[:-1], channels[1:]))
        self.proj = nn.Conv3d(channels[-1], out_channels, kernel_size=1, bias=True)

    def forward(self, features: list[torch.Tensor | None], lean: bool = False) -> torch.Tensor:
        """``features[i]`` (decoder width ``widths[i]``) is added before level ``i``."""
        x: torch.Tensor | int = 0
        for i, level in enumerate(self.dec):
            if i < len(features) and features[i] is not None:
                x = x + features[i]
            if lean and i == len(self.dec) - 1 and self.training and torch.is_grad_enabled():
                return self._last_level_lean(level, x)
            x = level(x, lean)
        return self.proj(x)

    def _last_level_lean(self, level: UNetBlock, x: torch.Tensor) -> torch.Tensor:
        # As UNetBlock's lean path, with the last BatchNorm fused into `proj`.
        conv1, bn1, _, conv2, bn2 = level.conv
        c1 = checkpoint(lambda s: conv1(level.up_sample(s)), x, use_reentrant=False,
                        context_fn=_RECOMPUTE_UPSAMPLING)
        return batch_norm_act_conv(batch_norm_act_conv(c1, bn1, True, conv2), bn2, False,
                                   self.proj)

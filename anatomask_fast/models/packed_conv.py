"""Convolutions of packed patches (N, C, q, q, q) that store as little as possible for
backward: the halo'd input of a 3x3x3 conv is rebuilt in backward from the unpadded
patches (which the block stores anyway), and norm -> LeakyReLU -> conv stores only the
norm's input and statistics, recomputing the activated map (element-wise) in backward,
the packed counterpart of :func:`anatomask_fast.models.decoder.batch_norm_act_conv`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..ops.packing import pad_halo, pad_halo_backward
from .packed_norm import NormStats

# On CPU, oneDNN copies NCDHW operands into its blocked layout (in backward about the
# size of the input and of the output): running the backward over chunks of patches
# bounds those copies by the chunk. The forward's copies are not at the peak.
_CPU_CHUNK_BYTES = 16 << 20


def _chunks(padded: torch.Tensor) -> list[slice]:
    n = padded.shape[0]
    if padded.device.type != "cpu" or n == 0:
        return [slice(0, n)]
    step = max(1, _CPU_CHUNK_BYTES // max(1, padded[0].numel() * padded.element_size()))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _conv_backward(grad: torch.Tensor, padded: torch.Tensor, weight: torch.Tensor,
                   has_bias: bool, stride: int, needs: tuple[bool, bool, bool]):
    """Gradients of ``conv3d(padded, weight, bias, stride)`` (padding 0) in (padded,
    weight, bias), chunked over patches on CPU."""
    def run(g: torch.Tensor, p: torch.Tensor):
        return torch.ops.aten.convolution_backward(
            g, p, weight, [weight.shape[0]] if has_bias else None, [stride] * 3, [0] * 3,
            [1] * 3, False, [0] * 3, 1, list(needs))

    chunks = _chunks(padded)
    if len(chunks) == 1:
        return run(grad, padded)
    grad_padded = torch.empty_like(padded) if needs[0] else None
    grad_weight = grad_bias = None
    for chunk in chunks:
        gp, gw, gb = run(grad[chunk], padded[chunk])
        if needs[0]:
            grad_padded[chunk] = gp
        del gp
        if needs[1]:
            grad_weight = gw if grad_weight is None else grad_weight.add_(gw)
        if needs[2]:
            grad_bias = gb if grad_bias is None else grad_bias.add_(gb)
    return grad_padded, grad_weight, grad_bias


def _pad(x: torch.Tensor, neighbours: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return pad_halo(x, neighbours, lo, hi) if lo or hi else x


def _halo_conv_backward(grad: torch.Tensor, x: torch.Tensor, neighbours: torch.Tensor,
                        lo: int, hi: int, weight: torch.Tensor, has_bias: bool, stride: int,
                        needs: tuple[bool, bool, bool]):
    """Gradients of ``conv3d(pad_halo(x), weight, bias, stride)`` in (x, weight, bias),
    the halo'd input rebuilt and freed before the halo adjoint runs (a temporary ``x``
    passed straight in is freed once padded)."""
    padded = _pad(x, neighbours, lo, hi)
    del x
    grad_padded, grad_weight, grad_bias = _conv_backward(grad.contiguous(), padded, weight,
                                                         has_bias, stride, needs)
    del padded
    if grad_padded is not None and (lo or hi):
        grad_padded = pad_halo_backward(grad_padded, neighbours, lo, hi)
    return grad_padded, grad_weight, grad_bias


class _HaloConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, neighbours, lo, hi, weight, bias, stride):
        ctx.save_for_backward(x, neighbours, weight)
        ctx.lo, ctx.hi, ctx.stride, ctx.has_bias = lo, hi, stride, bias is not None
        return F.conv3d(_pad(x, neighbours, lo, hi), weight, bias, stride=stride)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, neighbours, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_x, grad_weight, grad_bias = _halo_conv_backward(
            grad, x, neighbours, ctx.lo, ctx.hi, weight, ctx.has_bias, ctx.stride,
            (needs[0], needs[4], needs[5]))
        return grad_x, None, None, None, grad_weight, grad_bias, None


def halo_conv(x: torch.Tensor, neighbours: torch.Tensor, conv: torch.nn.Conv3d, lo: int,
              hi: int) -> torch.Tensor:
    """``conv`` at packed ``x``: a conv with padding 0 on the patches extended by a halo
    of ``lo``/``hi`` voxels (1/1 for a stride-1 3x3x3 conv with padding 1, 1/0 for a
    stride-2 one, 0/0 for a 1x1x1 conv); stores ``x`` only."""
    return _HaloConv.apply(x.contiguous(), neighbours, lo, hi, conv.weight, conv.bias,
                           conv.stride[0])


class _NormActHaloConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, group, groups, eps, slope, neighbours,
                conv_weight, conv_bias):
        stats = NormStats.of(x, group, groups, eps)
        y = stats.normalize(x, norm_weight, norm_bias, slope)
        padded = pad_halo(y, neighbours, 1, 1)
        del y
        ctx.save_for_backward(x, norm_weight, norm_bias, neighbours, conv_weight, *stats.saved())
        ctx.groups, ctx.slope, ctx.has_bias = groups, slope, conv_bias is not None
        return F.conv3d(padded, conv_weight, conv_bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, norm_weight, norm_bias, neighbours, conv_weight, *saved = ctx.saved_tensors
        stats = NormStats.restore(tuple(saved), ctx.groups)
        needs = ctx.needs_input_grad
        grad_y, grad_conv_weight, grad_conv_bias = _halo_conv_backward(
            grad, stats.normalize(x, norm_weight, norm_bias, ctx.slope), neighbours, 1, 1,
            conv_weight, ctx.has_bias, 1, (any(needs[:3]), needs[8], needs[9]))
        grad_x = grad_norm_weight = grad_norm_bias = None
        if grad_y is not None:
            grad_x, grad_norm_weight, grad_norm_bias = stats.backward(
                x, grad_y, norm_weight, norm_bias, ctx.slope, needs[:3])
        return (grad_x, grad_norm_weight, grad_norm_bias, None, None, None, None, None,
                grad_conv_weight, grad_conv_bias)


def norm_act_halo_conv(x: torch.Tensor, norm: torch.nn.Module, group: torch.Tensor, groups: int,
                       slope: float | None, neighbours: torch.Tensor,
                       conv: torch.nn.Conv3d) -> torch.Tensor:
    """``conv(act(packed_norm(x)))`` for a stride-1 3x3x3 ``conv`` (halo 1 on both
    sides), storing only ``x`` and the norm's per-group statistics."""
    return _NormActHaloConv.apply(x.contiguous(), norm.weight, norm.bias, group, groups,
                                  norm.eps, slope, neighbours, conv.weight, conv.bias)

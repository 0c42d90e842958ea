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
from .amp import AutocastState
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


def _conv_backward(
    grad: torch.Tensor,
    padded: torch.Tensor,
    weight: torch.Tensor,
    has_bias: bool,
    stride: int,
    needs: tuple[bool, bool, bool],
):
    """Gradients of ``conv3d(padded, weight, bias, stride)`` (padding 0) in (padded,
    weight, bias), chunked over patches on CPU. The forward's conv ran in ``grad``'s
    dtype (autocast's, under autocast): so does its backward; the gradients come back
    in the dtypes of ``padded`` and ``weight``."""
    compute = weight.to(grad.dtype)

    def run(g: torch.Tensor, p: torch.Tensor):
        gp, gw, gb = torch.ops.aten.convolution_backward(
            g,
            p.to(g.dtype),
            compute,
            [weight.shape[0]] if has_bias else None,
            [stride] * 3,
            [0] * 3,
            [1] * 3,
            False,
            [0] * 3,
            1,
            list(needs),
        )
        return (
            None if gp is None else gp.to(padded.dtype),
            None if gw is None else gw.to(weight.dtype),
            None if gb is None else gb.to(weight.dtype),
        )

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


def _halo_conv_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    neighbours: torch.Tensor,
    lo: int,
    hi: int,
    weight: torch.Tensor,
    has_bias: bool,
    stride: int,
    needs: tuple[bool, bool, bool],
):
    """Gradients of ``conv3d(pad_halo(x), weight, bias, stride)`` in (x, weight, bias),
    the halo'd input rebuilt and freed before the halo adjoint runs (a temporary ``x``
    passed straight in is freed once padded)."""
    padded = _pad(x, neighbours, lo, hi)
    del x
    grad_padded, grad_weight, grad_bias = _conv_backward(
        grad.contiguous(), padded, weight, has_bias, stride, needs
    )
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
            grad,
            x,
            neighbours,
            ctx.lo,
            ctx.hi,
            weight,
            ctx.has_bias,
            ctx.stride,
            (needs[0], needs[4], needs[5]),
        )
        return grad_x, None, None, None, grad_weight, grad_bias, None


def halo_conv(
    x: torch.Tensor, neighbours: torch.Tensor, conv: torch.nn.Conv3d, lo: int, hi: int
) -> torch.Tensor:
    """``conv`` at packed ``x``: a conv with padding 0 on the patches extended by a halo
    of ``lo``/``hi`` voxels (1/1 for a stride-1 3x3x3 conv with padding 1, 1/0 for a
    stride-2 one, 0/0 for a 1x1x1 conv); stores ``x`` only."""
    return _HaloConv.apply(
        x.contiguous(), neighbours, lo, hi, conv.weight, conv.bias, conv.stride[0]
    )


class _NormActHaloConv(torch.autograd.Function):
    """conv(act(norm(t))), ``t`` = ``x`` or, with a ``first`` conv (weight, bias, lo,
    hi, stride), ``t`` = that halo conv of ``x``, recomputed in backward: stores ``x``."""

    @staticmethod
    def forward(
        ctx,
        x,
        first,
        norm_weight,
        norm_bias,
        group,
        groups,
        eps,
        slope,
        neighbours,
        conv_weight,
        conv_bias,
        *first_params,
    ):
        t = _first_conv(x, first, first_params, neighbours)
        stats = NormStats.of(t, group, groups, eps)
        y = stats.normalize(t, norm_weight, norm_bias, slope)
        del t
        padded = pad_halo(y, neighbours, 1, 1)
        del y
        ctx.save_for_backward(
            x, norm_weight, norm_bias, neighbours, conv_weight, *first_params, *stats.saved()
        )
        ctx.first, ctx.groups, ctx.slope = first, groups, slope
        ctx.has_bias = conv_bias is not None
        ctx.autocast = AutocastState.current(x.device)
        return F.conv3d(padded, conv_weight, conv_bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, norm_weight, norm_bias, neighbours, conv_weight, *rest = ctx.saved_tensors
        first_params = tuple(rest[:-4])
        stats = NormStats.restore(tuple(rest[-4:]), ctx.groups)
        needs = ctx.needs_input_grad
        needs_x = needs[0] or any(needs[11:])  # the gradient of t, for x or conv1
        with ctx.autocast.restored():  # t as the forward computed it
            t = _first_conv(x, ctx.first, first_params, neighbours)
        grad_t, grad_conv_weight, grad_conv_bias = _halo_conv_backward(
            grad,
            stats.normalize(t, norm_weight, norm_bias, ctx.slope),
            neighbours,
            1,
            1,
            conv_weight,
            ctx.has_bias,
            1,
            (needs_x or needs[2] or needs[3], needs[9], needs[10]),
        )
        grad_norm_weight = grad_norm_bias = None
        if grad_t is not None:
            grad_t, grad_norm_weight, grad_norm_bias = stats.backward(
                t, grad_t, norm_weight, norm_bias, ctx.slope, (needs_x, needs[2], needs[3])
            )
        del t
        grad_first: list = []
        if ctx.first is not None:
            lo, hi, stride = ctx.first
            if grad_t is None:
                grad_first = [None] * len(first_params)
            else:
                grad_t, *grad_first = _halo_conv_backward(
                    grad_t,
                    x,
                    neighbours,
                    lo,
                    hi,
                    first_params[0],
                    len(first_params) > 1,
                    stride,
                    (needs[0], needs[11], any(needs[12:])),
                )
                grad_first = grad_first[: len(first_params)]
        return (
            grad_t,
            None,
            grad_norm_weight,
            grad_norm_bias,
            None,
            None,
            None,
            None,
            None,
            grad_conv_weight,
            grad_conv_bias,
            *grad_first,
        )


def _first_conv(
    x: torch.Tensor, first: tuple[int, int, int] | None, params: tuple, neighbours: torch.Tensor
) -> torch.Tensor:
    if first is None:
        return x
    lo, hi, stride = first
    return F.conv3d(
        _pad(x, neighbours, lo, hi),
        params[0],
        params[1] if len(params) > 1 else None,
        stride=stride,
    )


def norm_act_halo_conv(
    x: torch.Tensor,
    norm: torch.nn.Module,
    group: torch.Tensor,
    groups: int,
    slope: float | None,
    neighbours: torch.Tensor,
    conv: torch.nn.Conv3d,
    *,
    first: tuple[torch.nn.Conv3d, int, int] | None = None,
) -> torch.Tensor:
    """``conv(act(packed_norm(t)))`` for a stride-1 3x3x3 ``conv`` (halo 1 on both
    sides), storing only ``x`` and the norm's per-group statistics; ``t`` = ``x``, or
    with ``first`` = (conv1, lo, hi) ``t`` = :func:`halo_conv` (x, conv1, lo, hi),
    recomputed in backward (cheaper than storing it when ``x`` has few channels)."""
    spec, params = None, ()
    if first is not None:
        conv1, lo, hi = first
        spec = (lo, hi, conv1.stride[0])
        params = (conv1.weight,) if conv1.bias is None else (conv1.weight, conv1.bias)
    return _NormActHaloConv.apply(
        x.contiguous(),
        spec,
        norm.weight,
        norm.bias,
        group,
        groups,
        norm.eps,
        slope,
        neighbours,
        conv.weight,
        conv.bias,
        *params,
    )

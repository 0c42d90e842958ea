"""Triton kernels of the segmentation loss family: nnU-Net Dice + CE statistics from
logits (B, K, S) and labels (B, S) with the per-voxel softmax in registers, as
[K_PAD, BLOCK] tiles (each class row is a coalesced run of voxels)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from anatomask_fast import autograd
from anatomask_fast.contracts import check_seg_loss, check_seg_loss_backward
from anatomask_fast.numerics import accumulation_dtype
from anatomask_fast.outputs import new_output

from . import accumulation, kernel_op, launchable
from .gather_scatter import block_size


@triton.jit
def _softmax_tile(
    x_base,
    y_base,
    tile,
    S,
    K,
    ignore,
    HAS_IGNORE: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    """One tile's probabilities p [K_PAD, BLOCK], its logits, max and sum, the one-hot
    hit mask, the counted voxels and the invalid labels (outside [0, K), not ignored)."""
    ks = tl.arange(0, K_PAD)
    v = tile.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = v < S
    label = tl.load(y_base + v, mask=inside, other=0).to(tl.int64)
    if HAS_IGNORE:
        ignored = label == ignore
    else:
        ignored = label != label
    in_range = (label >= 0) & (label < K)
    valid = in_range & ~ignored & inside
    bad = ~in_range & ~ignored & inside
    both = (ks < K)[:, None] & inside[None, :]
    x = tl.load(
        x_base + ks[:, None].to(tl.int64) * S + v[None, :], mask=both, other=float("-inf")
    ).to(ACC)
    mx = tl.where(inside, tl.max(x, axis=0), 0.0)
    e = tl.exp(x - mx[None, :])
    s = tl.where(inside, tl.sum(e, axis=0), 1.0)
    p = e / s[None, :]
    hit = (ks[:, None] == label[None, :]) & valid[None, :]
    return p, x, mx, s, hit, valid, bad, v, both


@triton.jit
def _forward_kernel(
    x_ptr,
    y_ptr,
    class_ptr,
    ce_ptr,
    S,
    K,
    ignore,
    tiles_per_prog,
    HAS_IGNORE: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    n_prog = tl.num_programs(1)
    x_base = x_ptr + b * K * S
    y_base = y_ptr + b * S
    inter = tl.zeros([K_PAD], ACC)
    pred = tl.zeros([K_PAD], ACC)
    gt = tl.zeros([K_PAD], ACC)
    ce = tl.zeros([BLOCK], ACC)
    bad_count = tl.zeros([BLOCK], tl.int32)
    for t in range(0, tiles_per_prog):
        p, x, mx, s, hit, valid, bad, v, both = _softmax_tile(
            x_base, y_base, pid * tiles_per_prog + t, S, K, ignore, HAS_IGNORE, K_PAD, BLOCK, ACC
        )
        inter += tl.sum(tl.where(hit, p, 0.0), axis=1)
        pred += tl.sum(tl.where(valid[None, :], p, 0.0), axis=1)
        gt += tl.sum(hit.to(ACC), axis=1)
        x_label = tl.sum(tl.where(hit, x, 0.0), axis=0)
        ce += tl.where(valid, mx + tl.log(s) - x_label, 0.0)
        bad_count += bad.to(tl.int32)
    # Partials per program, summed by torch afterwards: deterministic, no atomics.
    ks = tl.arange(0, K_PAD)
    row = class_ptr + ((b * n_prog + pid) * 3) * K
    tl.store(row + ks, inter, mask=ks < K)
    tl.store(row + K + ks, pred, mask=ks < K)
    tl.store(row + 2 * K + ks, gt, mask=ks < K)
    ce_total = tl.sum(ce, axis=0)
    # Invalid labels cannot raise on the device: they turn the sample's CE into NaN.
    ce_total = tl.where(tl.sum(bad_count, axis=0) > 0, float("nan"), ce_total)
    tl.store(ce_ptr + b * n_prog + pid, ce_total)


@triton.jit
def _backward_kernel(
    gs_ptr,
    gc_ptr,
    x_ptr,
    y_ptr,
    grad_ptr,
    S,
    K,
    ignore,
    HAS_IGNORE: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    x_base = x_ptr + b * K * S
    p, x, mx, s, hit, valid, bad, v, both = _softmax_tile(
        x_base, y_ptr + b * S, tl.program_id(1), S, K, ignore, HAS_IGNORE, K_PAD, BLOCK, ACC
    )
    ks = tl.arange(0, K_PAD)
    g_inter = tl.load(gs_ptr + b * 3 * K + ks, mask=ks < K, other=0.0)
    g_pred = tl.load(gs_ptr + b * 3 * K + K + ks, mask=ks < K, other=0.0)
    g_ce = tl.load(gc_ptr + b)
    # d loss / d p_k per voxel, then the softmax Jacobian; the CE part is p - onehot.
    gp = g_pred[:, None] + tl.where(hit, g_inter[:, None], 0.0)
    dot = tl.sum(p * gp, axis=0)
    grad = p * (gp - dot[None, :]) + g_ce * (p - hit.to(p.dtype))
    grad = tl.where(valid[None, :], grad, 0.0)
    tl.store(
        grad_ptr + b * K * S + ks[:, None].to(tl.int64) * S + v[None, :],
        grad.to(grad_ptr.dtype.element_ty),
        mask=both,
    )


def _tiles(logits: torch.Tensor) -> tuple[int, int]:
    """(K_PAD, BLOCK): about 4096 tile elements on a GPU (registers), 64K under the
    interpreter (few programs)."""
    k_pad = triton.next_power_of_2(logits.shape[1])
    return k_pad, max(16, block_size(logits.device, 4096) // k_pad)


@kernel_op("anatomask_fast::dice_ce_loss_triton")
def dice_ce_loss_triton(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    check_seg_loss("dice_ce_loss", logits, labels)
    x, y = logits.contiguous(), labels.contiguous()
    B, K = x.shape[:2]
    S = y.shape[1]
    k_pad, block = _tiles(x)
    n_tiles = max(1, triton.cdiv(S, block))
    if x.device.type == "cuda":
        programs = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count
        n_prog = min(n_tiles, max(1, programs // max(B, 1)))
    else:
        n_prog = 1
    tiles_per_prog = triton.cdiv(n_tiles, n_prog)
    n_prog = triton.cdiv(n_tiles, tiles_per_prog)
    dtype = accumulation_dtype(x.dtype)
    class_part = new_output((B, n_prog, 3, K), dtype=dtype, device=x.device)
    ce_part = new_output((B, n_prog), dtype=dtype, device=x.device)
    if B:
        launchable(_forward_kernel)[(B, n_prog)](
            x,
            y,
            class_part,
            ce_part,
            S,
            K,
            0 if ignore_index is None else ignore_index,
            tiles_per_prog,
            HAS_IGNORE=ignore_index is not None,
            K_PAD=k_pad,
            BLOCK=block,
            ACC=accumulation(x.dtype),
        )
    return class_part.sum(1), ce_part.sum(1)


@kernel_op("anatomask_fast::dice_ce_loss_backward_triton")
def dice_ce_loss_backward_triton(
    grad_class_sums: torch.Tensor,
    grad_ce_sums: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int | None,
) -> torch.Tensor:
    op = "dice_ce_loss_backward"
    check_seg_loss(op, logits, labels)
    check_seg_loss_backward(op, grad_class_sums, grad_ce_sums, logits)
    x, y = logits.contiguous(), labels.contiguous()
    B, K = x.shape[:2]
    S = y.shape[1]
    dtype = accumulation_dtype(x.dtype)
    gs = grad_class_sums.to(dtype).contiguous()
    gc = grad_ce_sums.to(dtype).contiguous()
    grad = new_output(x.shape, dtype=x.dtype, device=x.device)
    k_pad, block = _tiles(x)
    if x.numel():
        launchable(_backward_kernel)[(B, triton.cdiv(S, block))](
            gs,
            gc,
            x,
            y,
            grad,
            S,
            K,
            0 if ignore_index is None else ignore_index,
            HAS_IGNORE=ignore_index is not None,
            K_PAD=k_pad,
            BLOCK=block,
            ACC=accumulation(x.dtype),
        )
    return grad


autograd.register_triton(autograd.seg_loss, globals())

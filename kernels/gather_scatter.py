"""Triton kernels of the gather/scatter family."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from anatomask_fast import autograd
from anatomask_fast.contracts import (
    check_activation,
    check_affine,
    check_ids_values,
    check_length,
    check_masked,
    check_norm_backward,
    check_param,
    check_token_ids,
)
from anatomask_fast.numerics import ACTIVATIONS, accumulation_dtype
from anatomask_fast.outputs import new_output
from anatomask_fast.validation import check_eps, check_index_values, check_tensor

from . import kernel_op, launchable


def block_size(device: torch.device, gpu_block: int) -> int:
    """The interpreter pays about a millisecond per program, so it gets few, large
    programs; a GPU gets ``gpu_block``."""
    return 1 << 16 if device.type == "cpu" else gpu_block


@triton.jit
def _apply_mask_kernel(
    x_ptr, mask_ptr, y_ptr, n, C, H, W, D, h, w, d, ph, pw, pd, BLOCK: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    k = offs % D
    row = offs // D
    j = row % W
    i = (row // W) % H
    b = row // (W * H * C)
    cell = ((b * h + i // ph) * w + j // pw) * d + k // pd
    keep = tl.load(mask_ptr + cell, mask=inside, other=0) != 0
    # Hidden positions are not read: masked-off lanes move no bytes.
    value = tl.load(x_ptr + offs, mask=inside & keep, other=0)
    tl.store(y_ptr + offs, value, mask=inside)


@kernel_op("anatomask_fast::apply_mask_triton")
def apply_mask_triton(x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    check_masked("apply_mask", x, active)
    x = x.contiguous()
    mask = active.contiguous().view(torch.uint8)
    y = new_output(x.shape, dtype=x.dtype, device=x.device)
    B, C, H, W, D = x.shape
    h, w, d = mask.shape[2:]
    n = x.numel()
    block = block_size(x.device, 1024)
    if n:
        launchable(_apply_mask_kernel)[(triton.cdiv(n, block),)](
            x, mask, y, n, C, H, W, D, h, w, d, H // h, W // w, D // d, BLOCK=block
        )
    return y


def _geometry(x: torch.Tensor, active: torch.Tensor) -> tuple[int, ...]:
    """(C, S=H*W*D, H, W, D, h, w, d, ph, pw, pd) of a volume and its mask."""
    _, C, H, W, D = x.shape
    h, w, d = active.shape[2:]
    return C, H * W * D, H, W, D, h, w, d, H // h, W // w, D // d


def _mask_bytes(active: torch.Tensor) -> torch.Tensor:
    return active.contiguous().view(torch.uint8)


@triton.jit
def _visible(mask_ptr, b, within, inside, H, W, D, h, w, d, ph, pw, pd):
    """Whether voxel ``within`` (index inside one (b, c) row of H*W*D) is visible."""
    k = within % D
    j = (within // D) % W
    i = within // (D * W)
    cell = ((b * h + i // ph) * w + j // pw) * d + k // pd
    return tl.load(mask_ptr + cell, mask=inside, other=0) != 0


@triton.jit
def _activate(v, ACT: tl.constexpr):
    if ACT == 1:
        v = tl.where(v > 0, v, v * 0.01)
    elif ACT == 2:
        v = tl.minimum(tl.maximum(v, 0.0), 6.0)
    return v


@triton.jit
def _activation_slope(v, ACT: tl.constexpr):
    """As PyTorch's leaky_relu / hardtanh backward."""
    one = tl.full(v.shape, 1.0, v.dtype)
    if ACT == 1:
        one = tl.where(v > 0, one, tl.full(v.shape, 0.01, v.dtype))
    elif ACT == 2:
        one = tl.where((v > 0) & (v < 6.0), one, 0.0)
    return one


# ---- densify ----


@triton.jit
def _densify_kernel(
    x_ptr, mask_ptr, token_ptr, y_ptr, n, C, S, H, W, D, h, w, d, ph, pw, pd, BLOCK: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    row = offs // S
    keep = _visible(mask_ptr, row // C, offs % S, inside, H, W, D, h, w, d, ph, pw, pd)
    value = tl.load(x_ptr + offs, mask=inside & keep, other=0)
    token = tl.load(token_ptr + row % C, mask=inside & ~keep, other=0)
    tl.store(y_ptr + offs, tl.where(keep, value, token), mask=inside)


@kernel_op("anatomask_fast::densify_triton")
def densify_triton(x: torch.Tensor, active: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    check_masked("densify", x, active)
    check_param("densify", "mask_token", mask_token, x.shape[1], x)
    x = x.contiguous()
    token = mask_token.reshape(-1).to(x.dtype).contiguous()
    y = new_output(x.shape, dtype=x.dtype, device=x.device)
    block = block_size(x.device, 1024)
    if x.numel():
        launchable(_densify_kernel)[(triton.cdiv(x.numel(), block),)](
            x, _mask_bytes(active), token, y, x.numel(), *_geometry(x, active), BLOCK=block
        )
    return y


@triton.jit
def _densify_backward_kernel(
    g_ptr, mask_ptr, gx_ptr, part_ptr, C, S, H, W, D, h, w, d, ph, pw, pd, BLOCK: tl.constexpr
):
    """Program (row, chunk): grad_x of BLOCK voxels of the (b, c) row, and their sum over
    hidden voxels into part[row, chunk]."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    within = chunk * BLOCK + tl.arange(0, BLOCK)
    inside = within < S
    keep = _visible(mask_ptr, row // C, within, inside, H, W, D, h, w, d, ph, pw, pd)
    g = tl.load(g_ptr + row * S + within, mask=inside, other=0)
    tl.store(gx_ptr + row * S + within, tl.where(keep, g, 0), mask=inside)
    hidden = tl.sum(tl.where(keep, 0, g.to(part_ptr.dtype.element_ty)), axis=0)
    tl.store(part_ptr + row * tl.num_programs(1) + chunk, hidden)


def _row_grid(x: torch.Tensor, gpu_block: int) -> tuple[int, int, int]:
    """(rows, chunks per row, block) for the per-(b, c)-row reductions."""
    rows, S = x.shape[0] * x.shape[1], x[0, 0].numel()
    block = min(block_size(x.device, gpu_block), triton.next_power_of_2(max(S, 1)))
    return rows, triton.cdiv(S, block), block


@kernel_op("anatomask_fast::densify_backward_triton")
def densify_backward_triton(
    grad: torch.Tensor, active: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    check_masked("densify_backward", grad, active, name="grad")
    grad = grad.contiguous()
    B, C = grad.shape[:2]
    grad_x = new_output(grad.shape, dtype=grad.dtype, device=grad.device)
    rows, chunks, block = _row_grid(grad, 4096)
    part = new_output((B, C, chunks), dtype=accumulation_dtype(grad.dtype), device=grad.device)
    if grad.numel():
        launchable(_densify_backward_kernel)[(rows, chunks)](
            grad, _mask_bytes(active), grad_x, part, *_geometry(grad, active), BLOCK=block
        )
    return grad_x, part.sum(dim=(0, 2))


# ---- sparse_norm ----


@triton.jit
def _moments_kernel(
    x_ptr, mask_ptr, part_ptr, C, S, H, W, D, h, w, d, ph, pw, pd, BLOCK: tl.constexpr
):
    """Program (row, chunk): count, mean and squared deviations (two-pass in registers)
    of the visible voxels of BLOCK voxels of a (b, c) row, into part[row, chunk, :3]."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    within = chunk * BLOCK + tl.arange(0, BLOCK)
    inside = within < S
    keep = inside & _visible(mask_ptr, row // C, within, inside, H, W, D, h, w, d, ph, pw, pd)
    v = tl.load(x_ptr + row * S + within, mask=keep, other=0).to(part_ptr.dtype.element_ty)
    n = tl.sum(keep.to(part_ptr.dtype.element_ty), axis=0)
    mean = tl.sum(v, axis=0) / tl.maximum(n, 1.0)
    dev = tl.where(keep, v - mean, 0.0)
    out = part_ptr + (row * tl.num_programs(1) + chunk) * 3
    tl.store(out, n)
    tl.store(out + 1, mean)
    tl.store(out + 2, tl.sum(dev * dev, axis=0))


def _group(part: torch.Tensor, per_sample: bool) -> torch.Tensor:
    """(B, C, chunks, k) row partials as (groups, C, parts, k)."""
    if per_sample:
        return part
    B, C, chunks, k = part.shape
    return part.transpose(0, 1).reshape(1, C, B * chunks, k)


def _norm_args(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> dict:
    """Kernel arguments shared by the normalize and gradient passes; a missing affine
    parameter is replaced by x's pointer and flagged off."""
    return dict(
        w_ptr=x
        if weight is None
        else weight.reshape(-1).to(accumulation_dtype(x.dtype)).contiguous(),
        b_ptr=x if bias is None else bias.reshape(-1).to(accumulation_dtype(x.dtype)).contiguous(),
        HAS_W=weight is not None,
        HAS_B=bias is not None,
    )


@triton.jit
def _element_site(mask_ptr, n, groups, C, S, H, W, D, h, w, d, ph, pw, pd, BLOCK: tl.constexpr):
    """The element-wise passes' block: offsets, in-bounds, channel, visible and the
    index of the row's statistics (per sample or pooled)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    row = offs // S
    b, c = row // C, row % C
    keep = inside & _visible(mask_ptr, b, offs % S, inside, H, W, D, h, w, d, ph, pw, pd)
    return offs, inside, c, keep, (b % groups) * C + c


@triton.jit
def _affine_pre(
    x_ptr,
    offs,
    keep,
    inside,
    stat,
    c,
    mean_ptr,
    rstd_ptr,
    w_ptr,
    b_ptr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
):
    """(xhat, weight, pre-activation) of the voxels at ``offs``."""
    mean = tl.load(mean_ptr + stat, mask=inside, other=0)
    rstd = tl.load(rstd_ptr + stat, mask=inside, other=1)
    xhat = (tl.load(x_ptr + offs, mask=keep, other=0).to(mean.dtype) - mean) * rstd
    wt = tl.full(xhat.shape, 1.0, mean.dtype)
    if HAS_W:
        wt = tl.load(w_ptr + c, mask=inside, other=1).to(mean.dtype)
    pre = xhat * wt
    if HAS_B:
        pre = pre + tl.load(b_ptr + c, mask=inside, other=0).to(mean.dtype)
    return xhat, wt, rstd, pre


@triton.jit
def _normalize_kernel(
    x_ptr,
    mask_ptr,
    mean_ptr,
    rstd_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    n,
    groups,
    C,
    S,
    H,
    W,
    D,
    h,
    w,
    d,
    ph,
    pw,
    pd,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs, inside, c, keep, stat = _element_site(
        mask_ptr, n, groups, C, S, H, W, D, h, w, d, ph, pw, pd, BLOCK
    )
    _, _, _, pre = _affine_pre(
        x_ptr, offs, keep, inside, stat, c, mean_ptr, rstd_ptr, w_ptr, b_ptr, HAS_W, HAS_B
    )
    y = tl.where(keep, _activate(pre, ACT), 0.0)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=inside)


@kernel_op("anatomask_fast::sparse_norm_triton")
def sparse_norm_triton(
    x: torch.Tensor,
    active: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    per_sample: bool,
    eps: float,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    op = "sparse_norm"
    check_masked(op, x, active)
    check_activation(op, activation)
    check_affine(op, x, weight, bias)
    check_eps(op, eps)
    x = x.contiguous()
    mask = _mask_bytes(active)
    geometry = _geometry(x, active)
    B, C = x.shape[:2]
    rows, chunks, block = _row_grid(x, 4096)
    part = new_output((B, C, chunks, 3), dtype=accumulation_dtype(x.dtype), device=x.device)
    if x.numel():
        launchable(_moments_kernel)[(rows, chunks)](x, mask, part, *geometry, BLOCK=block)
    # Tiny combine (Chan's parallel formula) over the chunks, and the batch if pooled.
    n, mu, m2 = _group(part, per_sample).unbind(-1)
    total = n.sum(-1)
    mean = (n * mu).sum(-1) / total.clamp_min(1)
    var = (m2 + n * (mu - mean.unsqueeze(-1)) ** 2).sum(-1) / total.clamp_min(1)
    rstd = torch.rsqrt(var + eps)
    y = new_output(x.shape, dtype=x.dtype, device=x.device)
    block = block_size(x.device, 1024)
    if x.numel():
        launchable(_normalize_kernel)[(triton.cdiv(x.numel(), block),)](
            x,
            mask,
            mean,
            rstd,
            y_ptr=y,
            n=x.numel(),
            groups=mean.shape[0],
            C=C,
            S=geometry[1],
            H=geometry[2],
            W=geometry[3],
            D=geometry[4],
            h=geometry[5],
            w=geometry[6],
            d=geometry[7],
            ph=geometry[8],
            pw=geometry[9],
            pd=geometry[10],
            ACT=ACTIVATIONS[activation][0],
            BLOCK=block,
            **_norm_args(x, weight, bias),
        )
    return y, mean, rstd


@triton.jit
def _norm_grad_sums_kernel(
    g_ptr,
    x_ptr,
    mask_ptr,
    mean_ptr,
    rstd_ptr,
    w_ptr,
    b_ptr,
    part_ptr,
    groups,
    C,
    S,
    H,
    W,
    D,
    h,
    w,
    d,
    ph,
    pw,
    pd,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (row, chunk): over its visible voxels, the count, sum of g' and of
    g' * xhat (g' the gradient before the activation) into part[row, chunk, :3]."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    within = chunk * BLOCK + tl.arange(0, BLOCK)
    inside = within < S
    b, c = row // C, row % C
    keep = inside & _visible(mask_ptr, b, within, inside, H, W, D, h, w, d, ph, pw, pd)
    offs = row * S + within
    zero = within * 0  # per-row parameters loaded as blocks, like the elementwise passes
    xhat, _, _, pre = _affine_pre(
        x_ptr,
        offs,
        keep,
        inside,
        (b % groups) * C + c + zero,
        c + zero,
        mean_ptr,
        rstd_ptr,
        w_ptr,
        b_ptr,
        HAS_W,
        HAS_B,
    )
    g = tl.load(g_ptr + offs, mask=keep, other=0).to(xhat.dtype) * _activation_slope(pre, ACT)
    g = tl.where(keep, g, 0.0)
    out = part_ptr + (row * tl.num_programs(1) + chunk) * 3
    tl.store(out, tl.sum(keep.to(xhat.dtype), axis=0))
    tl.store(out + 1, tl.sum(g, axis=0))
    tl.store(out + 2, tl.sum(g * xhat, axis=0))


@triton.jit
def _norm_grad_kernel(
    g_ptr,
    x_ptr,
    mask_ptr,
    mean_ptr,
    rstd_ptr,
    w_ptr,
    b_ptr,
    coef_ptr,
    gx_ptr,
    n,
    groups,
    C,
    S,
    H,
    W,
    D,
    h,
    w,
    d,
    ph,
    pw,
    pd,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """grad_x = rstd * w * (g' - mean(g') - xhat * mean(g' * xhat)) at visible voxels."""
    offs, inside, c, keep, stat = _element_site(
        mask_ptr, n, groups, C, S, H, W, D, h, w, d, ph, pw, pd, BLOCK
    )
    xhat, wt, rstd, pre = _affine_pre(
        x_ptr, offs, keep, inside, stat, c, mean_ptr, rstd_ptr, w_ptr, b_ptr, HAS_W, HAS_B
    )
    g = tl.load(g_ptr + offs, mask=keep, other=0).to(xhat.dtype) * _activation_slope(pre, ACT)
    mean_g = tl.load(coef_ptr + stat * 2, mask=inside, other=0)
    mean_gx = tl.load(coef_ptr + stat * 2 + 1, mask=inside, other=0)
    gx = tl.where(keep, rstd * wt * (g - mean_g - xhat * mean_gx), 0.0)
    tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=inside)


@kernel_op("anatomask_fast::sparse_norm_backward_triton")
def sparse_norm_backward_triton(
    grad: torch.Tensor,
    x: torch.Tensor,
    active: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    op = "sparse_norm_backward"
    check_masked(op, x, active)
    check_activation(op, activation)
    check_affine(op, x, weight, bias)
    check_norm_backward(op, grad, x, mean, rstd)
    grad, x = grad.contiguous(), x.contiguous()
    mask = _mask_bytes(active)
    geometry = _geometry(x, active)
    B, C = x.shape[:2]
    groups = mean.shape[0]
    common = dict(
        groups=groups,
        C=C,
        S=geometry[1],
        H=geometry[2],
        W=geometry[3],
        D=geometry[4],
        h=geometry[5],
        w=geometry[6],
        d=geometry[7],
        ph=geometry[8],
        pw=geometry[9],
        pd=geometry[10],
        ACT=ACTIVATIONS[activation][0],
        **_norm_args(x, weight, bias),
    )
    rows, chunks, block = _row_grid(x, 4096)
    part = new_output((B, C, chunks, 3), dtype=accumulation_dtype(x.dtype), device=x.device)
    if x.numel():
        launchable(_norm_grad_sums_kernel)[(rows, chunks)](
            grad, x, mask, mean, rstd, part_ptr=part, BLOCK=block, **common
        )
    n, sum_g, sum_gx = _group(part, groups == B).sum(2).unbind(-1)
    coef = torch.stack([sum_g, sum_gx], dim=-1) / n.clamp_min(1).unsqueeze(-1)
    grad_x = new_output(x.shape, dtype=x.dtype, device=x.device)
    block = block_size(x.device, 1024)
    if x.numel():
        launchable(_norm_grad_kernel)[(triton.cdiv(x.numel(), block),)](
            grad,
            x,
            mask,
            mean,
            rstd,
            coef_ptr=coef.contiguous(),
            gx_ptr=grad_x,
            n=x.numel(),
            BLOCK=block,
            **common,
        )
    return grad_x, sum_gx.sum(0), sum_g.sum(0)


# ---- token layout ----


@triton.jit
def _gather_rows_kernel(
    src_ptr,
    idx_ptr,
    fill_ptr,
    pos_ptr,
    out_ptr,
    n_src,
    n_idx,
    C,
    HAS_FILL: tl.constexpr,
    HAS_POS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out[b, i, :] = src[b, idx[b, i], :] if 0 <= idx < n_src, else the fill row (or
    zeros), plus pos[i, :]. Program (b * n_idx + i, channel block). Ids out of range
    read nothing (the fill instead): values are checked on the host for CPU tensors
    only, since a check of CUDA tensors would synchronize."""
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = cols < C
    idx = tl.load(idx_ptr + r) + cols * 0  # a block, so that it can join the load masks
    valid = (idx >= 0) & (idx < n_src)
    value = tl.load(src_ptr + ((r // n_idx) * n_src + idx) * C + cols, mask=inside & valid, other=0)
    if HAS_FILL:
        fill = tl.load(fill_ptr + cols, mask=inside & ~valid, other=0)
        value = tl.where(valid, value, fill)
    if HAS_POS:
        pos = tl.load(pos_ptr + (r % n_idx) * C + cols, mask=inside, other=0)
        value = value.to(pos.dtype) + pos  # pos is in the accumulation dtype
    tl.store(out_ptr + r * C + cols, value.to(out_ptr.dtype.element_ty), mask=inside)


def _gather_rows(
    src: torch.Tensor, idx: torch.Tensor, fill: torch.Tensor | None, pos: torch.Tensor | None
) -> torch.Tensor:
    src, idx = src.contiguous(), idx.contiguous()
    B, n_src, C = src.shape
    n_idx = idx.shape[1]
    out = new_output((B, n_idx, C), dtype=src.dtype, device=src.device)
    block_c = min(block_size(src.device, 1024), triton.next_power_of_2(max(C, 1)))
    if out.numel():
        launchable(_gather_rows_kernel)[(B * n_idx, triton.cdiv(C, block_c))](
            src,
            idx,
            src if fill is None else fill,
            src if pos is None else pos,
            out,
            n_src,
            n_idx,
            C,
            HAS_FILL=fill is not None,
            HAS_POS=pos is not None,
            BLOCK_C=block_c,
        )
    return out


@kernel_op("anatomask_fast::gather_tokens_triton")
def gather_tokens_triton(x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    check_token_ids("gather_tokens", ids_keep, x, "ids_keep", "x")
    check_index_values(
        "gather_tokens",
        "ids_keep",
        ids_keep,
        0,
        x.shape[1],
        f"the L={x.shape[1]} tokens of each sample",
    )
    return _gather_rows(x, ids_keep, None, None)


@kernel_op("anatomask_fast::gather_tokens_backward_triton")
def gather_tokens_backward_triton(
    grad: torch.Tensor, ids_keep: torch.Tensor, length: int
) -> torch.Tensor:
    op = "gather_tokens_backward"
    check_tensor(op, "grad", grad, ndim=3)
    check_token_ids(op, ids_keep, grad, "ids_keep", "grad", width=grad.shape[1])
    check_length(op, "length", length, grad.shape[1])
    check_ids_values(op, "ids_keep", ids_keep, length, permutation=False)
    # Which kept row lands in each slot (-1: none, a zero row): a (B, L) int64 map.
    B, K = ids_keep.shape
    source = torch.full((B, length), -1, dtype=torch.int64, device=grad.device)
    source.scatter_(1, ids_keep, torch.arange(K, device=grad.device).expand(B, K))
    return _gather_rows(grad, source, None, None)


@kernel_op("anatomask_fast::scatter_tokens_triton")
def scatter_tokens_triton(
    x_visible: torch.Tensor,
    ids_restore: torch.Tensor,
    mask_token: torch.Tensor,
    pos_embed: Optional[torch.Tensor],
) -> torch.Tensor:
    op = "scatter_tokens"
    check_token_ids(op, ids_restore, x_visible, "ids_restore", "x_visible")
    (_, K, C), L = x_visible.shape, ids_restore.shape[1]
    if K > L:
        raise ValueError(
            f"{op}: argument 'x_visible' has {K} tokens, more than the L={L} slots of 'ids_restore'"
        )
    check_param(op, "mask_token", mask_token, C, x_visible, "x_visible")
    if pos_embed is not None:
        check_param(op, "pos_embed", pos_embed, L * C, x_visible, "x_visible")
    check_ids_values(op, "ids_restore", ids_restore, L, permutation=True)
    dtype = x_visible.dtype
    token = mask_token.reshape(-1).to(dtype).contiguous()
    pos = (
        None
        if pos_embed is None
        else (
            pos_embed.reshape(ids_restore.shape[1], -1)
            .to(dtype)
            .to(accumulation_dtype(x_visible.dtype))
            .contiguous()
        )
    )
    return _gather_rows(x_visible, ids_restore, token, pos)


@triton.jit
def _scatter_tokens_backward_kernel(
    g_ptr,
    ids_ptr,
    gx_ptr,
    tok_ptr,
    pos_ptr,
    B,
    L,
    K,
    C,
    HAS_POS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Program (slot l, channel block): over the batch, sends grad[b, l] to
    grad_x[b, ids_restore[b, l]] when visible, else sums it into the mask token's partial
    for l; sums it over b into grad_pos[l]. One pass over grad."""
    l = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = cols < C
    token = tl.zeros((BLOCK_C,), dtype=tok_ptr.dtype.element_ty)
    pos = tl.zeros((BLOCK_C,), dtype=tok_ptr.dtype.element_ty)
    for b in range(B):
        idx = tl.load(ids_ptr + b * L + l) + cols * 0
        g = tl.load(g_ptr + (b * L + l) * C + cols, mask=inside, other=0)
        visible = (idx >= 0) & (idx < K)
        tl.store(gx_ptr + (b * K + idx) * C + cols, g, mask=inside & visible)
        token += tl.where(visible, 0.0, g.to(token.dtype))
        pos += g.to(pos.dtype)
    tl.store(tok_ptr + l * C + cols, token, mask=inside)
    if HAS_POS:
        tl.store(pos_ptr + l * C + cols, pos, mask=inside)


@kernel_op("anatomask_fast::scatter_tokens_backward_triton")
def scatter_tokens_backward_triton(
    grad: torch.Tensor, ids_restore: torch.Tensor, len_keep: int, with_pos: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    op = "scatter_tokens_backward"
    check_tensor(op, "grad", grad, ndim=3)
    check_token_ids(op, ids_restore, grad, "ids_restore", "grad", width=grad.shape[1])
    check_length(op, "len_keep", len_keep, 0, grad.shape[1])
    check_ids_values(op, "ids_restore", ids_restore, grad.shape[1], permutation=True)
    grad, ids = grad.contiguous(), ids_restore.contiguous()
    B, L, C = grad.shape
    acc = accumulation_dtype(grad.dtype)
    grad_x = new_output((B, len_keep, C), dtype=grad.dtype, device=grad.device)
    token_part = new_output((L, C), dtype=acc, device=grad.device)
    grad_pos = new_output((L if with_pos else 0, C), dtype=acc, device=grad.device)
    block_c = min(block_size(grad.device, 1024), triton.next_power_of_2(max(C, 1)))
    if grad.numel():
        launchable(_scatter_tokens_backward_kernel)[(L, triton.cdiv(C, block_c))](
            grad,
            ids,
            grad_x,
            token_part,
            grad_pos if with_pos else token_part,
            B,
            L,
            len_keep,
            C,
            HAS_POS=with_pos,
            BLOCK_C=block_c,
        )
    return grad_x, token_part.sum(0), grad_pos


autograd.register_triton(autograd.gather_scatter, globals())

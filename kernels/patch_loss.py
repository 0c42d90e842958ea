"""Triton kernels of the patch-loss family: one program per (sample, patch), reading
the patch straight from the dense (B, C, H, W, D) volumes (rows of pd contiguous
values). The forward keeps a patch of up to MAX_ONE_CHUNK values in registers and
reads each input once; larger patches are streamed in chunks (the re-reads of the
target hit the cache)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from anatomask_fast import autograd
from anatomask_fast.contracts import check_patch_loss, check_patch_tables
from anatomask_fast.numerics import accumulation_dtype
from anatomask_fast.outputs import new_output
from anatomask_fast.validation import check_eps

from . import accumulation, kernel_op, launchable

# The largest patch (values) the forward holds in registers, by device type. The
# interpreter pays per operation, not per register, so it takes whole patches.
MAX_ONE_CHUNK = {"cpu": 1 << 16, "cuda": 8192}
# Values per step where patches are streamed (larger forwards, every backward).
CHUNK = {"cpu": 1 << 16, "cuda": 2048}


def _blocks(n: int, device: torch.device) -> tuple[int, bool, int]:
    """(BLOCK, ONE_CHUNK, num_warps) of the forward for patches of n values."""
    block = triton.next_power_of_2(max(n, 1))
    if block > MAX_ONE_CHUNK[device.type]:
        return CHUNK[device.type], False, 8
    return block, True, 8 if block >= 4096 else 4


@triton.jit
def _patch_offsets(
    pid, n, L, C, H, W, D, w, d, PH: tl.constexpr, PW: tl.constexpr, PD: tl.constexpr
):
    """Offsets of values ``n`` (channel-major within the patch) of patch ``pid`` =
    b*L + l in the volume."""
    b = pid // L
    l = pid % L
    k = l % d
    j = (l // d) % w
    i = l // (d * w)
    base = ((b * C * H + i * PH) * W + j * PW) * D + k * PD
    e = n % PD
    z = (n // PD) % PW
    y = (n // (PD * PW)) % PH
    c = (n // (PD * PW * PH)).to(tl.int64)
    return base + ((c * H + y) * W + z) * D + e


@triton.jit
def _needed(visible, HIDDEN_ONLY: tl.constexpr):
    """Whether a patch is evaluated: always, or only when hidden."""
    if HIDDEN_ONLY:
        needed = visible == 0
    else:
        needed = visible == visible
    return needed


@triton.jit
def _forward_kernel(
    rec_ptr,
    x_ptr,
    mask_ptr,
    pp_ptr,
    mean_ptr,
    rstd_ptr,
    N,
    L,
    C,
    H,
    W,
    D,
    w,
    d,
    eps,
    PH: tl.constexpr,
    PW: tl.constexpr,
    PD: tl.constexpr,
    NORM_PIX: tl.constexpr,
    HIDDEN_ONLY: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    visible = tl.load(mask_ptr + pid) != 0
    # Visible patches in hidden-only mode move no bytes: every load is masked off.
    needed = _needed(visible, HIDDEN_ONLY)
    limit = tl.where(needed, N, 0)  # values to read
    hidden = tl.where(visible, 0.0, 1.0).to(ACC)
    n = tl.arange(0, BLOCK)
    mean = tl.zeros([BLOCK], ACC)
    scale = tl.full([BLOCK], 1.0, ACC)
    if ONE_CHUNK:
        inside = n < limit
        offs = _patch_offsets(pid, n, L, C, H, W, D, w, d, PH, PW, PD)
        t = tl.load(x_ptr + offs, mask=inside, other=0).to(ACC)
        r = tl.load(rec_ptr + offs, mask=inside, other=0).to(ACC)
        if NORM_PIX:
            mean += tl.sum(t, 0) / N
            centered = tl.where(inside, t - mean, 0)
            scale = scale / tl.sqrt(tl.sum(centered * centered, 0) / (N - 1) + eps)
        diff = tl.where(inside, r - (t - mean) * scale, 0)
        err = tl.sum(diff * diff, 0)
    else:
        if NORM_PIX:
            total = tl.zeros([BLOCK], ACC)
            for start in range(0, N, BLOCK):
                inside = start + n < limit
                offs = _patch_offsets(pid, start + n, L, C, H, W, D, w, d, PH, PW, PD)
                total += tl.load(x_ptr + offs, mask=inside, other=0).to(ACC)
            mean += tl.sum(total, 0) / N
            total = tl.zeros([BLOCK], ACC)
            for start in range(0, N, BLOCK):
                inside = start + n < limit
                offs = _patch_offsets(pid, start + n, L, C, H, W, D, w, d, PH, PW, PD)
                t = tl.load(x_ptr + offs, mask=inside, other=0).to(ACC)
                centered = tl.where(inside, t - mean, 0)
                total += centered * centered
            scale = scale / tl.sqrt(tl.sum(total, 0) / (N - 1) + eps)
        total = tl.zeros([BLOCK], ACC)
        for start in range(0, N, BLOCK):
            inside = start + n < limit
            offs = _patch_offsets(pid, start + n, L, C, H, W, D, w, d, PH, PW, PD)
            t = tl.load(x_ptr + offs, mask=inside, other=0).to(ACC)
            r = tl.load(rec_ptr + offs, mask=inside, other=0).to(ACC)
            diff = tl.where(inside, r - (t - mean) * scale, 0)
            total += diff * diff
        err = tl.sum(total, 0)
    # `e * hidden` as a product, like the reference: NaN in a visible patch shows.
    # mean and scale are lane-uniform vectors: lane 0 stores the patch's value.
    first = n == 0
    tl.store(pp_ptr + pid + n, tl.where(needed, err / N * hidden, 0), mask=first)
    tl.store(mean_ptr + pid + n, tl.where(needed, mean, 0), mask=first)
    tl.store(rstd_ptr + pid + n, tl.where(needed, scale, 0), mask=first)


@triton.jit
def _backward_kernel(
    grad_pp_ptr,
    rec_ptr,
    x_ptr,
    mask_ptr,
    mean_ptr,
    rstd_ptr,
    out_ptr,
    N,
    L,
    C,
    H,
    W,
    D,
    w,
    d,
    PH: tl.constexpr,
    PW: tl.constexpr,
    PD: tl.constexpr,
    HIDDEN_ONLY: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    visible = tl.load(mask_ptr + pid) != 0
    needed = _needed(visible, HIDDEN_ONLY)
    limit = tl.where(needed, N, 0)  # values to read
    # d(e * hidden)/dr = hidden * 2/N * (r - t').
    coef = tl.load(grad_pp_ptr + pid).to(ACC) * tl.where(visible, 0.0, 1.0).to(ACC) * 2 / N
    mean = tl.load(mean_ptr + pid)
    scale = tl.load(rstd_ptr + pid)
    n = tl.arange(0, BLOCK)
    for start in range(0, N, BLOCK):
        inside = start + n < N
        offs = _patch_offsets(pid, start + n, L, C, H, W, D, w, d, PH, PW, PD)
        t = tl.load(x_ptr + offs, mask=start + n < limit, other=0).to(ACC)
        r = tl.load(rec_ptr + offs, mask=start + n < limit, other=0).to(ACC)
        grad = tl.where(needed, coef * (r - (t - mean) * scale), 0)
        tl.store(out_ptr + offs, grad.to(out_ptr.dtype.element_ty), mask=inside)


def _geometry(x: torch.Tensor, active: torch.Tensor) -> dict:
    B, C, H, W, D = x.shape
    h, w, d = active.shape[2:]
    return dict(
        N=C * (H // h) * (W // w) * (D // d),
        L=h * w * d,
        C=C,
        H=H,
        W=W,
        D=D,
        w=w,
        d=d,
        PH=H // h,
        PW=W // w,
        PD=D // d,
    )


@kernel_op("anatomask_fast::patch_recon_loss_triton")
def patch_recon_loss_triton(
    rec: torch.Tensor,
    x: torch.Tensor,
    active: torch.Tensor,
    norm_pix: bool,
    eps: float,
    hidden_only: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per_patch, mean, rstd), each (B, L): see csrc/ops.cpp patch_recon_loss."""
    check_patch_loss("patch_recon_loss", rec, x, active)
    check_eps("patch_recon_loss", eps)
    rec, x = rec.contiguous(), x.contiguous()
    mask = active.contiguous().view(torch.uint8)
    shape = (active.shape[0], active[0].numel())
    dtype = accumulation_dtype(x.dtype)
    per_patch, mean, rstd = (new_output(shape, dtype=dtype, device=x.device) for _ in range(3))
    geo = _geometry(x, active)
    block, one_chunk, warps = _blocks(geo["N"], x.device)
    if per_patch.numel() and geo["N"]:
        launchable(_forward_kernel)[(per_patch.numel(),)](
            rec,
            x,
            mask,
            per_patch,
            mean,
            rstd,
            eps=eps,
            NORM_PIX=norm_pix,
            HIDDEN_ONLY=hidden_only,
            ACC=accumulation(x.dtype),
            BLOCK=block,
            ONE_CHUNK=one_chunk,
            num_warps=warps,
            **geo,
        )
    return per_patch, mean, rstd


@kernel_op("anatomask_fast::patch_recon_loss_backward_triton")
def patch_recon_loss_backward_triton(
    grad_per_patch: torch.Tensor,
    rec: torch.Tensor,
    x: torch.Tensor,
    active: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    hidden_only: bool,
) -> torch.Tensor:
    op = "patch_recon_loss_backward"
    check_patch_loss(op, rec, x, active)
    check_patch_tables(op, x, active, grad_per_patch=grad_per_patch, mean=mean, rstd=rstd)
    rec, x = rec.contiguous(), x.contiguous()
    grad = new_output(rec.shape, dtype=rec.dtype, device=rec.device)
    geo = _geometry(x, active)
    block = min(triton.next_power_of_2(max(geo["N"], 1)), CHUNK[x.device.type])
    if grad.numel():
        launchable(_backward_kernel)[(active.numel(),)](
            grad_per_patch.contiguous(),
            rec,
            x,
            active.contiguous().view(torch.uint8),
            mean.contiguous(),
            rstd.contiguous(),
            grad,
            HIDDEN_ONLY=hidden_only,
            ACC=accumulation(x.dtype),
            BLOCK=block,
            num_warps=8,
            **geo,
        )
    return grad


autograd.register_triton(autograd.patch_loss, globals())

"""Triton kernels of the packing family: one program per block of output elements,
each element computing its source from the index tables (gathers only: no atomics,
the halo adjoint included)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from anatomask_fast.contracts import (check_halo, check_layout_values, check_neighbour_values,
                                      check_pack, check_unpack)
from anatomask_fast.outputs import new_output

from . import launchable
from .gather_scatter import block_size


@triton.jit
def _unravel(offs, C, X, Y, Z):
    """(patch or sample, channel, x, y, z) of flat offsets into a (*, C, X, Y, Z) tensor."""
    z = offs % Z
    y = (offs // Z) % Y
    x = (offs // (Z * Y)) % X
    c = (offs // (Z * Y * X)) % C
    return offs // (Z * Y * X * C), c, x, y, z


@triton.jit
def _pack_kernel(x_ptr, patches_ptr, out_ptr, n, C, h, w, d, ph, pw, pd,
                 BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    p, c, i, j, k = _unravel(offs, C, ph, pw, pd)
    cell = tl.load(patches_ptr + p, mask=inside, other=0)
    k0 = cell % d
    j0 = (cell // d) % w
    i0 = (cell // (d * w)) % h
    b = cell // (d * w * h)
    src = (((b * C + c) * (h * ph) + i0 * ph + i) * (w * pw) + j0 * pw + j) * (d * pd) + k0 * pd + k
    tl.store(out_ptr + offs, tl.load(x_ptr + src, mask=inside, other=0), mask=inside)


@triton.jit
def _unpack_kernel(packed_ptr, slots_ptr, out_ptr, n, C, h, w, d, ph, pw, pd,
                   BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    b, c, I, J, K = _unravel(offs, C, h * ph, w * pw, d * pd)
    slot = tl.load(slots_ptr + ((b * h + I // ph) * w + J // pw) * d + K // pd, mask=inside,
                   other=-1)
    src = (((slot * C + c) * ph + I % ph) * pw + J % pw) * pd + K % pd
    value = tl.load(packed_ptr + src, mask=inside & (slot >= 0), other=0)
    tl.store(out_ptr + offs, value, mask=inside)


@triton.jit
def _halo_source(t, lo, p):
    """Along one axis: the neighbour offset (-1, 0, 1) and local index of halo'd t."""
    u = t - lo
    o = tl.where(u < 0, -1, tl.where(u >= p, 1, 0))
    return o, u - o * p


@triton.jit
def _pad_halo_kernel(packed_ptr, nb_ptr, out_ptr, n, C, ph, pw, pd, lo, hi,
                     BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    m, c, ti, tj, tk = _unravel(offs, C, ph + lo + hi, pw + lo + hi, pd + lo + hi)
    oi, li = _halo_source(ti, lo, ph)
    oj, lj = _halo_source(tj, lo, pw)
    ok, lk = _halo_source(tk, lo, pd)
    source = tl.load(nb_ptr + m * 27 + (oi + 1) * 9 + (oj + 1) * 3 + ok + 1, mask=inside,
                     other=-1)
    src = (((source * C + c) * ph + li) * pw + lj) * pd + lk
    value = tl.load(packed_ptr + src, mask=inside & (source >= 0), other=0)
    tl.store(out_ptr + offs, value, mask=inside)


@triton.jit
def _pad_halo_backward_kernel(grad_ptr, nb_ptr, out_ptr, n, C, ph, pw, pd, lo, hi,
                              BLOCK: tl.constexpr, ACC: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    th = ph + lo + hi
    tw = pw + lo + hi
    td = pd + lo + hi
    m, c, i, j, k = _unravel(offs, C, ph, pw, pd)
    acc = tl.zeros([BLOCK], dtype=ACC)
    # Patch n = neighbour of m at -o reads m's voxel at halo'd position o*p + local + lo.
    for a in tl.static_range(3):
        ti = (a - 1) * ph + i + lo
        for e in tl.static_range(3):
            tj = (e - 1) * pw + j + lo
            for f in tl.static_range(3):
                tk = (f - 1) * pd + k + lo
                valid = inside & (ti >= 0) & (ti < th) & (tj >= 0) & (tj < tw) & (tk >= 0) & (tk < td)
                src_patch = tl.load(nb_ptr + m * 27 + (2 - a) * 9 + (2 - e) * 3 + (2 - f),
                                    mask=valid, other=-1)
                g = tl.load(grad_ptr + (((src_patch * C + c) * th + ti) * tw + tj) * td + tk,
                            mask=valid & (src_patch >= 0), other=0)
                acc += g.to(ACC)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=inside)


def _launch(kernel, n: int, device: torch.device, *args, **meta) -> None:
    block = block_size(device, 1024)
    if n:
        launchable(kernel)[(triton.cdiv(n, block),)](*args, BLOCK=block, **meta)


@triton_op("anatomask_fast::pack_patches_triton", mutates_args=())
def pack_patches_triton(x: torch.Tensor, patches: torch.Tensor,
                        slots: torch.Tensor) -> torch.Tensor:
    check_pack("pack_patches", x, patches, slots)
    check_layout_values("pack_patches", patches, slots)
    x = x.contiguous()
    B, C, H, W, D = x.shape
    _, h, w, d = slots.shape
    out = new_output((patches.shape[0], C, H // h, W // w, D // d), dtype=x.dtype,
                     device=x.device)
    _launch(_pack_kernel, out.numel(), x.device, x, patches.contiguous(), out, out.numel(),
            C, h, w, d, H // h, W // w, D // d)
    return out


@triton_op("anatomask_fast::unpack_patches_triton", mutates_args=())
def unpack_patches_triton(packed: torch.Tensor, patches: torch.Tensor,
                          slots: torch.Tensor) -> torch.Tensor:
    check_unpack("unpack_patches", packed, patches, slots)
    check_layout_values("unpack_patches", patches, slots)
    packed = packed.contiguous()
    B, h, w, d = slots.shape
    N, C, ph, pw, pd = packed.shape
    out = new_output((B, C, h * ph, w * pw, d * pd), dtype=packed.dtype, device=packed.device)
    _launch(_unpack_kernel, out.numel(), packed.device, packed, slots.contiguous(), out,
            out.numel(), C, h, w, d, ph, pw, pd)
    return out


@triton_op("anatomask_fast::pad_halo_triton", mutates_args=())
def pad_halo_triton(packed: torch.Tensor, neighbours: torch.Tensor, lo: int,
                    hi: int) -> torch.Tensor:
    check_halo("pad_halo", "packed", packed, neighbours, lo, hi, padded=False)
    check_neighbour_values("pad_halo", neighbours)
    packed = packed.contiguous()
    N, C, ph, pw, pd = packed.shape
    out = new_output((N, C, ph + lo + hi, pw + lo + hi, pd + lo + hi), dtype=packed.dtype,
                     device=packed.device)
    _launch(_pad_halo_kernel, out.numel(), packed.device, packed, neighbours.contiguous(), out,
            out.numel(), C, ph, pw, pd, lo, hi)
    return out


@triton_op("anatomask_fast::pad_halo_backward_triton", mutates_args=())
def pad_halo_backward_triton(grad: torch.Tensor, neighbours: torch.Tensor, lo: int,
                             hi: int) -> torch.Tensor:
    check_halo("pad_halo_backward", "grad", grad, neighbours, lo, hi, padded=True)
    check_neighbour_values("pad_halo_backward", neighbours)
    grad = grad.contiguous()
    N, C, th, tw, td = grad.shape
    ph, pw, pd = th - lo - hi, tw - lo - hi, td - lo - hi
    out = new_output((N, C, ph, pw, pd), dtype=grad.dtype, device=grad.device)
    acc = tl.float64 if grad.dtype == torch.float64 else tl.float32
    _launch(_pad_halo_backward_kernel, out.numel(), grad.device, grad, neighbours.contiguous(),
            out, out.numel(), C, ph, pw, pd, lo, hi, ACC=acc)
    return out


def _save_layout(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[1], inputs[2])


def _pack_backward(ctx, grad: torch.Tensor):
    patches, slots = ctx.saved_tensors
    return unpack_patches_triton(grad, patches, slots), None, None


def _unpack_backward(ctx, grad: torch.Tensor):
    patches, slots = ctx.saved_tensors
    return pack_patches_triton(grad, patches, slots), None, None


def _save_halo(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[1])
    ctx.lo, ctx.hi = inputs[2], inputs[3]


def _pad_halo_backward(ctx, grad: torch.Tensor):
    (neighbours,) = ctx.saved_tensors
    return pad_halo_backward_triton(grad, neighbours, ctx.lo, ctx.hi), None, None, None


pack_patches_triton.register_autograd(_pack_backward, setup_context=_save_layout)
unpack_patches_triton.register_autograd(_unpack_backward, setup_context=_save_layout)
pad_halo_triton.register_autograd(_pad_halo_backward, setup_context=_save_halo)

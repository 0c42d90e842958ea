"""Triton kernels of the packing family: one program per block of output elements,
each element computing its source from the index tables (gathers only: no atomics,
the halo adjoint included)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from anatomask_fast import autograd
from anatomask_fast.contracts import (
    check_halo,
    check_layout_values,
    check_neighbour_values,
    check_pack,
    check_unpack,
)
from anatomask_fast.outputs import new_output

from . import accumulation, kernel_op, launchable
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
def _pack_kernel(x_ptr, patches_ptr, out_ptr, n, C, h, w, d, ph, pw, pd, BLOCK: tl.constexpr):
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
def _unpack_kernel(packed_ptr, slots_ptr, out_ptr, n, C, h, w, d, ph, pw, pd, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    b, c, I, J, K = _unravel(offs, C, h * ph, w * pw, d * pd)
    slot = tl.load(
        slots_ptr + ((b * h + I // ph) * w + J // pw) * d + K // pd, mask=inside, other=-1
    )
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
def _pad_halo_kernel(packed_ptr, nb_ptr, out_ptr, n, C, ph, pw, pd, lo, hi, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    m, c, ti, tj, tk = _unravel(offs, C, ph + lo + hi, pw + lo + hi, pd + lo + hi)
    oi, li = _halo_source(ti, lo, ph)
    oj, lj = _halo_source(tj, lo, pw)
    ok, lk = _halo_source(tk, lo, pd)
    source = tl.load(nb_ptr + m * 27 + (oi + 1) * 9 + (oj + 1) * 3 + ok + 1, mask=inside, other=-1)
    src = (((source * C + c) * ph + li) * pw + lj) * pd + lk
    value = tl.load(packed_ptr + src, mask=inside & (source >= 0), other=0)
    tl.store(out_ptr + offs, value, mask=inside)


@triton.jit
def _pad_halo_backward_kernel(
    grad_ptr, nb_ptr, out_ptr, n, C, ph, pw, pd, lo, hi, BLOCK: tl.constexpr, ACC: tl.constexpr
):
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
                valid = (
                    inside & (ti >= 0) & (ti < th) & (tj >= 0) & (tj < tw) & (tk >= 0) & (tk < td)
                )
                src_patch = tl.load(
                    nb_ptr + m * 27 + (2 - a) * 9 + (2 - e) * 3 + (2 - f), mask=valid, other=-1
                )
                g = tl.load(
                    grad_ptr + (((src_patch * C + c) * th + ti) * tw + tj) * td + tk,
                    mask=valid & (src_patch >= 0),
                    other=0,
                )
                acc += g.to(ACC)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=inside)


def _launch(kernel, n: int, device: torch.device, *args, **meta) -> None:
    block = block_size(device, 1024)
    if n:
        launchable(kernel)[(triton.cdiv(n, block),)](*args, BLOCK=block, **meta)


def _moved(
    kernel, source: torch.Tensor, index: torch.Tensor, shape: tuple[int, ...], *geometry: int
) -> torch.Tensor:
    """A new ``shape`` tensor filled by ``kernel`` from ``source`` through the layout
    table ``index`` (pack: ``patches``; unpack: ``slots``)."""
    source = source.contiguous()
    out = new_output(shape, dtype=source.dtype, device=source.device)
    _launch(
        kernel, out.numel(), source.device, source, index.contiguous(), out, out.numel(), *geometry
    )
    return out


@kernel_op("anatomask_fast::pack_patches_triton")
def pack_patches_triton(
    x: torch.Tensor, patches: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    check_pack("pack_patches", x, patches, slots)
    check_layout_values("pack_patches", patches, slots)
    _, C, H, W, D = x.shape
    _, h, w, d = slots.shape
    return _moved(
        _pack_kernel,
        x,
        patches,
        (patches.shape[0], C, H // h, W // w, D // d),
        C,
        h,
        w,
        d,
        H // h,
        W // w,
        D // d,
    )


@kernel_op("anatomask_fast::unpack_patches_triton")
def unpack_patches_triton(
    packed: torch.Tensor, patches: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    check_unpack("unpack_patches", packed, patches, slots)
    check_layout_values("unpack_patches", patches, slots)
    B, h, w, d = slots.shape
    _, C, ph, pw, pd = packed.shape
    return _moved(
        _unpack_kernel, packed, slots, (B, C, h * ph, w * pw, d * pd), C, h, w, d, ph, pw, pd
    )


def _halo(
    op: str,
    name: str,
    source: torch.Tensor,
    neighbours: torch.Tensor,
    lo: int,
    hi: int,
    *,
    padded: bool,
    kernel,
    **meta,
) -> torch.Tensor:
    """pad_halo (``padded=False``: each patch grows by its halo) and its adjoint
    (``padded=True``: each halo'd patch's gradient is gathered back into its patches):
    the same checks and launch, the kernels taking the patch sizes (ph, pw, pd)."""
    check_halo(op, name, source, neighbours, lo, hi, padded=padded)
    check_neighbour_values(op, neighbours)
    source = source.contiguous()
    N, C, *side = source.shape
    patch = [s - lo - hi for s in side] if padded else side
    shape = patch if padded else [s + lo + hi for s in side]
    out = new_output((N, C, *shape), dtype=source.dtype, device=source.device)
    _launch(
        kernel,
        out.numel(),
        source.device,
        source,
        neighbours.contiguous(),
        out,
        out.numel(),
        C,
        *patch,
        lo,
        hi,
        **meta,
    )
    return out


@kernel_op("anatomask_fast::pad_halo_triton")
def pad_halo_triton(
    packed: torch.Tensor, neighbours: torch.Tensor, lo: int, hi: int
) -> torch.Tensor:
    return _halo(
        "pad_halo", "packed", packed, neighbours, lo, hi, padded=False, kernel=_pad_halo_kernel
    )


@kernel_op("anatomask_fast::pad_halo_backward_triton")
def pad_halo_backward_triton(
    grad: torch.Tensor, neighbours: torch.Tensor, lo: int, hi: int
) -> torch.Tensor:
    return _halo(
        "pad_halo_backward",
        "grad",
        grad,
        neighbours,
        lo,
        hi,
        padded=True,
        kernel=_pad_halo_backward_kernel,
        ACC=accumulation(grad.dtype),
    )


autograd.register_triton(autograd.packing, globals())

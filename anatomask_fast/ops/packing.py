"""Packing family: the visible patches of a feature map as a batch of small volumes
(with halos from neighbouring patches), so that convolutions run on visible data only.
Index conventions: anatomask_fast/reference/packing.py."""
from __future__ import annotations

import torch

from .. import _extension
from ..dispatch import Op
from ..reference.packing import (pack_patches_reference, pad_halo_backward_reference,
                                 pad_halo_reference, unpack_patches_reference)
from ..validation import (check_index_values, check_same_device, check_tensor, check_volume,
                          kernel_checks_values, register_fake, require)

PACK_PATCHES = Op("pack_patches", reference=pack_patches_reference, cpp="pack_patches",
                  triton="packing:pack_patches_triton")
UNPACK_PATCHES = Op("unpack_patches", reference=unpack_patches_reference, cpp="unpack_patches",
                    triton="packing:unpack_patches_triton")
PAD_HALO = Op("pad_halo", reference=pad_halo_reference, cpp="pad_halo",
              triton="packing:pad_halo_triton")
PAD_HALO_BACKWARD = Op("pad_halo_backward", reference=pad_halo_backward_reference,
                       cpp="pad_halo_backward", triton="packing:pad_halo_backward_triton")


def _check_index(op: str, name: str, value: object, ndim: int) -> torch.Tensor:
    return check_tensor(op, name, value, ndim=ndim, dtypes=(torch.int64,))


def _check_layout(op: str, patches: object, slots: object, batch: int | None) -> None:
    _check_index(op, "patches", patches, 1)
    _check_index(op, "slots", slots, 4)
    if batch is not None and slots.shape[0] != batch:
        raise ValueError(f"{op}: argument 'slots' must have batch {batch} (B, h, w, d), "
                         f"got shape {tuple(slots.shape)}")


def _check_layout_values(op: str, patches: torch.Tensor, slots: torch.Tensor) -> None:
    """The layout contract (the C++ kernels' check_layout_values, csrc/packing.h):
    ``slots[patches[n]] = n`` for every n and -1 at every other cell, as
    ``MaskLayout`` builds them; then every backend reads the same cells."""
    N, cells = patches.numel(), slots.numel()
    check_index_values(op, "patches", patches, 0, cells,
                       f"the {cells} cells of the {list(slots.shape)} grid of 'slots'")
    check_index_values(op, "slots", slots, -1, N, f"the {N} packed patches (or -1 where hidden)")
    if cells == 0 or torch.compiler.is_compiling():
        return
    flat = slots.reshape(-1)
    order = torch.arange(N, device=slots.device)
    agree = (flat[patches.clamp(0, cells - 1)] == order).all() & ((flat >= 0).sum() == N)
    require(agree, f"{op}: arguments 'patches' and 'slots' disagree: slots must hold n at "
                   "cell patches[n] and -1 at every other cell")


def _check_neighbour_values(op: str, neighbours: torch.Tensor) -> None:
    """The C++ kernels' check_neighbour_values (csrc/packing.h): indices in [-1, N),
    and symmetric, as a grid's (the adjoint reads the table backwards):
    ``neighbours[n, o] = m >= 0`` implies ``neighbours[m, 26 - o] = n``."""
    N = neighbours.shape[0]
    check_index_values(op, "neighbours", neighbours, -1, N,
                       f"the {N} packed patches (or -1 for zeros)")
    if N == 0 or torch.compiler.is_compiling():
        return
    back = (26 - torch.arange(27, device=neighbours.device)).expand_as(neighbours)
    mirrored = neighbours[neighbours.clamp(0, N - 1), back]
    own = torch.arange(N, device=neighbours.device)[:, None]
    require(((neighbours < 0) | (mirrored == own)).all(),
            f"{op}: argument 'neighbours' must be symmetric (neighbours[n, o] = m implies "
            "neighbours[m, 26 - o] = n)")


def pack_patches(x: torch.Tensor, patches: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The visible patches of ``x`` (B, C, H, W, D) as (N, C, ph, pw, pd), in the order
    of ``patches``; the grid (h, w, d) is ``slots.shape[1:]``. Differentiable in ``x``
    (the adjoint is :func:`unpack_patches`)."""
    check_volume("pack_patches", "x", x)
    _check_layout("pack_patches", patches, slots, x.shape[0])
    grid, spatial = tuple(slots.shape[1:]), tuple(x.shape[2:])
    if any(g <= 0 or s % g for g, s in zip(grid, spatial)):
        raise ValueError(f"pack_patches: the grid {grid} of 'slots' must divide the spatial "
                         f"shape {spatial} of 'x'")
    check_same_device("pack_patches", x=x, patches=patches, slots=slots)
    backend = PACK_PATCHES.select(x.device)
    if not kernel_checks_values(backend):
        _check_layout_values("pack_patches", patches, slots)
    return PACK_PATCHES.kernel(backend)(x, patches, slots)


def unpack_patches(packed: torch.Tensor, patches: torch.Tensor,
                   slots: torch.Tensor) -> torch.Tensor:
    """Packed patches (N, C, ph, pw, pd) scattered into a (B, C, h*ph, w*pw, d*pd) map,
    zero at hidden cells. Differentiable (the adjoint is :func:`pack_patches`)."""
    check_volume("unpack_patches", "packed", packed)
    _check_layout("unpack_patches", patches, slots, None)
    if patches.shape[0] != packed.shape[0]:
        raise ValueError(f"unpack_patches: argument 'patches' must have {packed.shape[0]} "
                         f"entries (one per packed patch), got {patches.shape[0]}")
    check_same_device("unpack_patches", packed=packed, patches=patches, slots=slots)
    backend = UNPACK_PATCHES.select(packed.device)
    if not kernel_checks_values(backend):
        _check_layout_values("unpack_patches", patches, slots)
    return UNPACK_PATCHES.kernel(backend)(packed, patches, slots)


def pad_halo(packed: torch.Tensor, neighbours: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Each patch of ``packed`` (N, C, ph, pw, pd) extended by ``lo`` voxels on the low
    and ``hi`` on the high side of every axis, read from its neighbours (``neighbours``
    (N, 27)), zero where a neighbour is hidden or outside the volume. ``lo=hi=1``
    serves a stride-1 3x3x3 conv, ``lo=1, hi=0`` a stride-2 one (padding 1).
    Differentiable; the backward is the deterministic gather-add adjoint."""
    _check_halo("pad_halo", "packed", packed, neighbours, lo, hi, padded=False)
    backend = PAD_HALO.select(packed.device)
    if not kernel_checks_values(backend):
        _check_neighbour_values("pad_halo", neighbours)
    return PAD_HALO.kernel(backend)(packed, neighbours, lo, hi)


def pad_halo_backward(grad: torch.Tensor, neighbours: torch.Tensor, lo: int,
                      hi: int) -> torch.Tensor:
    """The adjoint of :func:`pad_halo` applied to ``grad`` (N, C, ph+lo+hi, pw+lo+hi,
    pd+lo+hi): each patch (N, C, ph, pw, pd) sums the gradient of every halo'd patch
    that read it (deterministic gather-add). For backward passes that rebuild a halo'd
    tensor themselves; not differentiable."""
    _check_halo("pad_halo_backward", "grad", grad, neighbours, lo, hi, padded=True)
    backend = PAD_HALO_BACKWARD.select(grad.device)
    if not kernel_checks_values(backend):
        _check_neighbour_values("pad_halo_backward", neighbours)
    return PAD_HALO_BACKWARD.kernel(backend)(grad, neighbours, lo, hi)


def _check_halo(op: str, name: str, tensor: torch.Tensor, neighbours: torch.Tensor, lo: int,
                hi: int, *, padded: bool) -> None:
    """``tensor`` (N, C, ...) (its patches already ``padded`` by the halo or not),
    ``neighbours`` (N, 27), halo widths in [0, the unpadded patch side]."""
    check_volume(op, name, tensor)
    _check_index(op, "neighbours", neighbours, 2)
    if tuple(neighbours.shape) != (tensor.shape[0], 27):
        raise ValueError(f"{op}: argument 'neighbours' must have shape "
                         f"({tensor.shape[0]}, 27), got {tuple(neighbours.shape)}")
    widths = lo + hi if padded and all(isinstance(v, int) for v in (lo, hi)) else 0
    bound = min(tensor.shape[2:]) - widths
    for arg, value in (("lo", lo), ("hi", hi)):
        if not isinstance(value, int) or not 0 <= value <= bound:
            raise ValueError(f"{op}: argument '{arg}' must be an int in [0, {bound}] "
                             f"(at most the patch side), got {value!r}")
    check_same_device(op, **{name: tensor}, neighbours=neighbours)


def _register_cpp() -> None:
    """Fake kernels and autograd for the C++ operators (schemas in csrc/ops.cpp)."""
    ops = torch.ops.anatomask_fast

    @register_fake("anatomask_fast::pack_patches")
    def _(x, patches, slots):
        B, C, H, W, D = x.shape
        _, h, w, d = slots.shape
        return x.new_empty(patches.shape[0], C, H // h, W // w, D // d)

    @register_fake("anatomask_fast::unpack_patches")
    def _(packed, patches, slots):
        B, h, w, d = slots.shape
        _, C, ph, pw, pd = packed.shape
        return packed.new_empty(B, C, h * ph, w * pw, d * pd)

    @register_fake("anatomask_fast::pad_halo")
    def _(packed, neighbours, lo, hi):
        N, C, *side = packed.shape
        return packed.new_empty(N, C, *(s + lo + hi for s in side))

    @register_fake("anatomask_fast::pad_halo_backward")
    def _(grad, neighbours, lo, hi):
        N, C, *side = grad.shape
        return grad.new_empty(N, C, *(s - lo - hi for s in side))

    def save_layout(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[1], inputs[2])

    def pack_backward(ctx, grad):
        patches, slots = ctx.saved_tensors
        return ops.unpack_patches(grad, patches, slots), None, None

    def unpack_backward(ctx, grad):
        patches, slots = ctx.saved_tensors
        return ops.pack_patches(grad, patches, slots), None, None

    def save_halo(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[1])
        ctx.lo, ctx.hi = inputs[2], inputs[3]

    def halo_backward(ctx, grad):
        (neighbours,) = ctx.saved_tensors
        return ops.pad_halo_backward(grad, neighbours, ctx.lo, ctx.hi), None, None, None

    def halo_double_backward(ctx, grad):
        (neighbours,) = ctx.saved_tensors
        return ops.pad_halo(grad, neighbours, ctx.lo, ctx.hi), None, None, None

    torch.library.register_autograd("anatomask_fast::pack_patches", pack_backward,
                                    setup_context=save_layout)
    torch.library.register_autograd("anatomask_fast::unpack_patches", unpack_backward,
                                    setup_context=save_layout)
    torch.library.register_autograd("anatomask_fast::pad_halo", halo_backward,
                                    setup_context=save_halo)
    torch.library.register_autograd("anatomask_fast::pad_halo_backward", halo_double_backward,
                                    setup_context=save_halo)


if _extension.load()[0] is not None:
    _register_cpp()

"""Packing family: the visible patches of a feature map as a batch of small volumes
(with halos from neighbouring patches), so that convolutions run on visible data only.
Index conventions: anatomask_fast/reference/packing.py."""

from __future__ import annotations

import torch

from .. import _extension, autograd
from ..contracts import (
    check_halo,
    check_layout_values,
    check_neighbour_values,
    check_pack,
    check_unpack,
)
from ..dispatch import Op
from ..reference.packing import (
    pack_patches_reference,
    pad_halo_backward_reference,
    pad_halo_reference,
    unpack_patches_reference,
)
from ..validation import register_fake

PACK_PATCHES = Op(
    "pack_patches",
    reference=pack_patches_reference,
    cpp="pack_patches",
    triton="packing:pack_patches_triton",
)
UNPACK_PATCHES = Op(
    "unpack_patches",
    reference=unpack_patches_reference,
    cpp="unpack_patches",
    triton="packing:unpack_patches_triton",
)
PAD_HALO = Op(
    "pad_halo", reference=pad_halo_reference, cpp="pad_halo", triton="packing:pad_halo_triton"
)
PAD_HALO_BACKWARD = Op(
    "pad_halo_backward",
    reference=pad_halo_backward_reference,
    cpp="pad_halo_backward",
    triton="packing:pad_halo_backward_triton",
)


def pack_patches(x: torch.Tensor, patches: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The visible patches of ``x`` (B, C, H, W, D) as (N, C, ph, pw, pd), in the order
    of ``patches``; the grid (h, w, d) is ``slots.shape[1:]``. Differentiable in ``x``
    (the adjoint is :func:`unpack_patches`). ``patches`` and ``slots`` must be a
    ``MaskLayout``'s pair (``slots[patches[n]] = n``, -1 elsewhere): checked by every
    backend (the C++ and Triton kernels themselves)."""
    check_pack("pack_patches", x, patches, slots)
    backend = PACK_PATCHES.select(x.device)
    if backend == "reference":
        check_layout_values("pack_patches", patches, slots)
    return PACK_PATCHES.kernel(backend)(x, patches, slots)


def unpack_patches(
    packed: torch.Tensor, patches: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    """Packed patches (N, C, ph, pw, pd) scattered into a (B, C, h*ph, w*pw, d*pd) map,
    zero at hidden cells. Differentiable (the adjoint is :func:`pack_patches`). The
    layout contract of :func:`pack_patches` applies."""
    check_unpack("unpack_patches", packed, patches, slots)
    backend = UNPACK_PATCHES.select(packed.device)
    if backend == "reference":
        check_layout_values("unpack_patches", patches, slots)
    return UNPACK_PATCHES.kernel(backend)(packed, patches, slots)


def pad_halo(packed: torch.Tensor, neighbours: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Each patch of ``packed`` (N, C, ph, pw, pd) extended by ``lo`` voxels on the low
    and ``hi`` on the high side of every axis, read from its neighbours (``neighbours``
    (N, 27), symmetric as a ``MaskLayout``'s), zero where a neighbour is hidden or
    outside the volume. ``lo=hi=1`` serves a stride-1 3x3x3 conv, ``lo=1, hi=0`` a
    stride-2 one (padding 1). Differentiable; the backward is the deterministic
    gather-add adjoint."""
    check_halo("pad_halo", "packed", packed, neighbours, lo, hi, padded=False)
    backend = PAD_HALO.select(packed.device)
    if backend == "reference":
        check_neighbour_values("pad_halo", neighbours)
    return PAD_HALO.kernel(backend)(packed, neighbours, lo, hi)


def pad_halo_backward(
    grad: torch.Tensor, neighbours: torch.Tensor, lo: int, hi: int
) -> torch.Tensor:
    """The adjoint of :func:`pad_halo` applied to ``grad`` (N, C, ph+lo+hi, pw+lo+hi,
    pd+lo+hi): each patch (N, C, ph, pw, pd) sums the gradient of every halo'd patch
    that read it (deterministic gather-add). For backward passes that rebuild a halo'd
    tensor themselves; not differentiable."""
    check_halo("pad_halo_backward", "grad", grad, neighbours, lo, hi, padded=True)
    backend = PAD_HALO_BACKWARD.select(grad.device)
    if backend == "reference":
        check_neighbour_values("pad_halo_backward", neighbours)
    return PAD_HALO_BACKWARD.kernel(backend)(grad, neighbours, lo, hi)


def _register_cpp() -> None:
    """Fake kernels and autograd for the C++ operators (schemas in csrc/ops.cpp)."""

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

    autograd.register_cpp(autograd.packing)


if _extension.load()[0] is not None:
    _register_cpp()

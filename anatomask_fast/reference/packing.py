"""Reference packing ops: visible patches of a feature map as a batch of small
volumes, with halos read from neighbouring patches, in plain PyTorch.

Conventions shared by every backend (see anatomask_fast/models/layout.py):
- ``patches`` (N,) int64: flat cell index ``((b*h + i)*w + j)*d + k`` of each
  visible patch, increasing.
- ``slots`` (B, h, w, d) int64: the packed index of each cell, -1 where hidden.
- ``neighbours`` (N, 27) int64: the packed index of the cell at offset
  ``(oi, oj, ok)`` in {-1, 0, 1}^3 (column ``(oi+1)*9 + (oj+1)*3 + ok+1``), -1 where
  that cell is hidden or outside the volume.
"""

from __future__ import annotations

import torch


def _cells(x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, H, W, D) -> (B*h*w*d, C, ph, pw, pd), a permuted copy."""
    B, C, H, W, D = x.shape
    h, w, d = grid
    v = x.reshape(B, C, h, H // h, w, W // w, d, D // d).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return v.reshape(B * h * w * d, C, H // h, W // w, D // d)


def pack_patches_reference(
    x: torch.Tensor, patches: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    """The visible patches of ``x`` (B, C, H, W, D) as (N, C, ph, pw, pd)."""
    return _cells(x, tuple(slots.shape[1:]))[patches]


def unpack_patches_reference(
    packed: torch.Tensor, patches: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    """Packed patches (N, C, ph, pw, pd) back into a zero-filled (B, C, H, W, D) map."""
    B, h, w, d = slots.shape
    _, C, ph, pw, pd = packed.shape
    cells = packed.new_zeros(B * h * w * d, C, ph, pw, pd).index_copy(0, patches, packed)
    v = cells.reshape(B, h, w, d, C, ph, pw, pd).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return v.reshape(B, C, h * ph, w * pw, d * pd)


def pad_halo_reference(
    packed: torch.Tensor, neighbours: torch.Tensor, lo: int, hi: int
) -> torch.Tensor:
    """Each packed patch (N, C, ph, pw, pd) extended by ``lo`` voxels on the low side
    and ``hi`` on the high side of every axis, read from its neighbours (zero where a
    neighbour is hidden or outside): (N, C, ph+lo+hi, pw+lo+hi, pd+lo+hi). A conv with
    padding 0 on the result equals the dense conv (padding ``lo``) at the patch."""
    N, C, *side = packed.shape
    # Row N of `source` is the zero patch that hidden/outside neighbours read.
    source = torch.cat([packed, packed.new_zeros(1, C, *side)])
    out = packed.new_zeros(N, C, *(s + lo + hi for s in side))

    def ranges(s: int) -> list[tuple[int, slice, slice]]:
        """(offset, source slice, destination slice) along one axis of side s."""
        return [
            (-1, slice(s - lo, s), slice(0, lo)),
            (0, slice(0, s), slice(lo, lo + s)),
            (1, slice(0, hi), slice(lo + s, lo + s + hi)),
        ]

    for oi, si, ti in ranges(side[0]):
        for oj, sj, tj in ranges(side[1]):
            for ok, sk, tk in ranges(side[2]):
                column = neighbours[:, (oi + 1) * 9 + (oj + 1) * 3 + ok + 1]
                rows = torch.where(column < 0, N, column)
                out[:, :, ti, tj, tk] = source[rows][:, :, si, sj, sk]
    return out


def pad_halo_backward_reference(
    grad: torch.Tensor, neighbours: torch.Tensor, lo: int, hi: int
) -> torch.Tensor:
    """The adjoint of :func:`pad_halo_reference` applied to ``grad`` (N, C, ph+lo+hi,
    ...): its vector-Jacobian product (the op is linear, so at any input)."""
    N, C, *side = grad.shape
    with torch.enable_grad():
        x = grad.new_zeros(N, C, *(s - lo - hi for s in side), requires_grad=True)
        return torch.autograd.grad(pad_halo_reference(x, neighbours, lo, hi), x, grad)[0]

"""Inputs shared by the packing ops' tests (pack_patches, unpack_patches, pad_halo,
pad_halo_backward): odd grids, anisotropic patches, single-voxel patches, B=1."""

from __future__ import annotations

import torch

from anatomask_fast.models import MaskLayout
from anatomask_fast.reference import pack_patches_reference

from .helpers import random_mask

# (B, C, grid, patch side)
SHAPES = [
    (2, 3, (3, 2, 4), (4, 4, 4)),
    (1, 2, (2, 3, 1), (3, 2, 5)),
    (3, 1, (2, 2, 2), (1, 1, 1)),
    (2, 5, (1, 4, 3), (2, 6, 2)),
]
HALOS = [(1, 1), (1, 0), (0, 1), (0, 0)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def case(batch, channels, grid, side, dtype, device, seed):
    """(layout, x, generator): a random visible mask's layout and a map of its grid."""
    gen = torch.Generator().manual_seed(seed)
    active = random_mask(batch, grid, keep=0.6, generator=gen)
    layout = MaskLayout.build(active)
    spatial = tuple(g * s for g, s in zip(grid, side))
    x = torch.randn(batch, channels, *spatial, generator=gen).to(device, dtype)
    return layout, x, gen


def packed_case(dtype, seed, *, channels=2, grid=(2, 2, 1), side=(2, 3, 2)):
    """(layout, packed): the packed visible patches of a random map, a leaf that
    requires grad (for gradcheck and opcheck)."""
    layout, x, _ = case(2, channels, grid, side, dtype, "cpu", seed)
    return layout, pack_patches_reference(x, layout.patches, layout.slots).requires_grad_()


def layout_on(device, layout):
    """(patches, slots, neighbours) on ``device``."""
    return layout.patches.to(device), layout.slots.to(device), layout.neighbours.to(device)


def bad_layout_call(call, error, match):
    """Runs ``call(x, layout)`` on a (2, 3, 8, 8, 8) map and expects ``error``."""
    import pytest

    active = random_mask(2, (2, 2, 2), generator=torch.Generator().manual_seed(0))
    with pytest.raises(error, match=match):
        call(torch.randn(2, 3, 8, 8, 8), MaskLayout.build(active))

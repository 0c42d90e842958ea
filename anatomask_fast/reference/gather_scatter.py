"""Reference gather/scatter ops, computed the way the published SparK/AnatoMask code does."""
from __future__ import annotations

import torch


def upsample_mask(active: torch.Tensor, spatial: tuple[int, int, int]) -> torch.Tensor:
    """The full-resolution bool mask, as the reference builds it: ``repeat_interleave``
    three times."""
    h, w, d = active.shape[2:]
    H, W, D = spatial
    return (active.repeat_interleave(H // h, dim=2)
                  .repeat_interleave(W // w, dim=3)
                  .repeat_interleave(D // d, dim=4))


def apply_mask_reference(x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """``x * upsample(active)``: hidden positions of ``x`` set to zero."""
    return x * upsample_mask(active, tuple(x.shape[2:]))

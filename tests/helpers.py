"""Shared test utilities."""
from __future__ import annotations

import torch

# Tolerances by dtype for results accumulated in fp32 and compared with a float64 or
# fp32 reference: about 8 ulps of the stored dtype, since outputs are rounded once.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=8e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=6e-2, atol=1e-2),
}


def random_mask(batch: int, grid: tuple[int, int, int], *, keep: float = 0.4,
                generator: torch.Generator | None = None, device: str = "cpu") -> torch.Tensor:
    """A random visible mask (B, 1, h, w, d) with at least one visible cell per sample."""
    mask = torch.rand(batch, 1, *grid, generator=generator) < keep
    mask.view(batch, -1)[:, 0] = True
    return mask.to(device)

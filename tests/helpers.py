"""Shared test utilities."""
from __future__ import annotations

import importlib
import pkgutil

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


def raw_op(name: str, backend: str):
    """The raw operator ``name`` of a compiled backend (overload ``default``): the C++
    one for ``cpu`` and ``cuda``, its ``_triton`` twin for ``triton`` (every kernel
    module imported, so that the Triton operators are registered)."""
    if backend == "triton":
        import anatomask_fast.kernels as kernels

        for module in pkgutil.iter_modules(kernels.__path__):
            importlib.import_module(f"anatomask_fast.kernels.{module.name}")
        name += "_triton"
    return getattr(torch.ops.anatomask_fast, name).default


def on(device: str, *values):
    """``values`` with every tensor moved to ``device`` (leaves keep requires_grad)."""
    return tuple(v.detach().to(device).requires_grad_(v.requires_grad)
                 if isinstance(v, torch.Tensor) else v for v in values)


def opcheck(name: str, backend: str, device: str, *args) -> None:
    """``torch.library.opcheck`` of backend's operator ``name`` on ``args`` (on
    ``device``): its fake kernel, its autograd registration, torch.compile's traces."""
    torch.library.opcheck(raw_op(name, backend), on(device, *args))

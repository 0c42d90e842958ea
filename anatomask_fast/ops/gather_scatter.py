"""Gather/scatter family: moving data around the visible mask."""
from __future__ import annotations

import torch

from .. import _extension
from ..dispatch import Op
from ..reference.gather_scatter import apply_mask_reference
from ..validation import check_active_mask, check_volume

APPLY_MASK = Op("apply_mask", reference=apply_mask_reference, cpp="apply_mask",
                triton="gather_scatter:apply_mask_triton")


def apply_mask(x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Zeroes the hidden patches of ``x`` (B, C, H, W, D) given the visible mask
    ``active`` (B, 1, h, w, d, bool, True = visible), without building the
    full-resolution mask. Differentiable in ``x``; hidden outputs are exactly zero."""
    check_volume("apply_mask", "x", x)
    check_active_mask("apply_mask", active, x)
    return APPLY_MASK(x.device)(x, active)


def _register_cpp() -> None:
    """Fake kernel and autograd for the C++ operator (its schema is in csrc/ops.cpp)."""
    op = "anatomask_fast::apply_mask"

    @torch.library.register_fake(op)
    def _(x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape)

    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[1])

    def backward(ctx, grad: torch.Tensor):
        (active,) = ctx.saved_tensors
        return torch.ops.anatomask_fast.apply_mask(grad, active), None

    torch.library.register_autograd(op, backward, setup_context=setup_context)


if _extension.load()[0] is not None:
    _register_cpp()

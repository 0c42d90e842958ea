"""Triton kernels of the gather/scatter family."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from anatomask_fast.outputs import new_output


def block_size(device: torch.device, gpu_block: int) -> int:
    """The interpreter pays about a millisecond per program, so it gets few, large
    programs; a GPU gets ``gpu_block``."""
    return 1 << 16 if device.type == "cpu" else gpu_block


@triton.jit
def _apply_mask_kernel(x_ptr, mask_ptr, y_ptr, n, C, H, W, D, h, w, d, ph, pw, pd,
                       BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    k = offs % D
    row = offs // D
    j = row % W
    i = (row // W) % H
    b = row // (W * H * C)
    cell = ((b * h + i // ph) * w + j // pw) * d + k // pd
    keep = tl.load(mask_ptr + cell, mask=inside, other=0) != 0
    # Hidden positions are not read: masked-off lanes move no bytes.
    value = tl.load(x_ptr + offs, mask=inside & keep, other=0)
    tl.store(y_ptr + offs, value, mask=inside)


@triton_op("anatomask_fast::apply_mask_triton", mutates_args=())
def apply_mask_triton(x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    mask = active.contiguous().view(torch.uint8)
    y = new_output(x.shape, dtype=x.dtype, device=x.device)
    B, C, H, W, D = x.shape
    h, w, d = mask.shape[2:]
    n = x.numel()
    block = block_size(x.device, 1024)
    if n:
        wrap_triton(_apply_mask_kernel)[(triton.cdiv(n, block),)](
            x, mask, y, n, C, H, W, D, h, w, d, H // h, W // w, D // d, BLOCK=block)
    return y


def _setup_apply_mask(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[1])


def _apply_mask_backward(ctx, grad: torch.Tensor):
    (active,) = ctx.saved_tensors
    return apply_mask_triton(grad, active), None


apply_mask_triton.register_autograd(_apply_mask_backward, setup_context=_setup_apply_mask)

"""Triton kernel of the mask_select family: one program per sample, the whole sample
in one block (padded to a power of two, L up to 8192 and beyond).

Each selection finds the k-th smallest 32-bit key by a bitwise binary search (32
block-wide counts), takes every key below it and, among keys equal to it, the lowest
indices (a cumulative sum). Random keys are Philox4x32-10 words laid out as the CPU
and CUDA kernels lay them out (word g % 4 of ``tl.randint4x(seed, offset + g // 4)``
for element g = b * L + l), so the three backends give the same masks for the same
seed, bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from anatomask_fast.contracts import check_selection
from anatomask_fast.outputs import new_output

from . import kernel_op, launchable


@triton.jit
def _float_order(x):
    """Monotone map of finite float32 to uint32 (-0 and +0 equal)."""
    bits = tl.where(x == 0.0, 0.0, x).to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)


@triton.jit
def _select_smallest(key, eligible, k):
    """The k smallest eligible keys, ties by lower position."""
    one = tl.full([], 1, tl.uint32)
    threshold = tl.full([], 0, tl.uint32)
    # The largest t with fewer than k eligible keys below t is the k-th smallest key.
    for i in range(32):
        mid = threshold | (one << (31 - i))
        below = tl.sum((eligible & (key < mid)).to(tl.int32), axis=0)
        threshold = tl.where(below < k, mid, threshold)
    less = eligible & (key < threshold)
    equal = eligible & (key == threshold)
    rank = tl.cumsum(equal.to(tl.int32), axis=0)
    return less | (equal & (rank <= k - tl.sum(less.to(tl.int32), axis=0)))


@triton.jit
def _anatomical_mask_kernel(
    errors_ptr,
    noise_ptr,
    active_ptr,
    hard_ptr,
    shuffle_ptr,
    restore_ptr,
    L,
    len_keep,
    n_hard,
    seed,
    offset,
    HAS_NOISE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * L
    idx = tl.arange(0, BLOCK)
    inside = idx < L
    hard = idx < 0
    if n_hard > 0:
        errors = tl.load(errors_ptr + row + idx, mask=inside, other=0.0).to(tl.float32)
        hard = _select_smallest(~_float_order(errors), inside, n_hard)
    if HAS_NOISE:
        key = _float_order(tl.load(noise_ptr + row + idx, mask=inside, other=0.0))
    else:
        element = row + idx
        r0, r1, r2, r3 = tl.randint4x(seed, offset + element // 4)
        word = element % 4
        key = tl.where(word == 0, r0, tl.where(word == 1, r1, tl.where(word == 2, r2, r3)))
    hidden = hard | _select_smallest(key, inside & ~hard, L - len_keep - n_hard)
    kept = inside & ~hidden
    kept_count = kept.to(tl.int32)
    kept_before = tl.cumsum(kept_count, axis=0) - kept_count
    position = tl.where(kept, kept_before, len_keep + idx - kept_before).to(tl.int64)
    tl.store(active_ptr + row + idx, kept.to(tl.uint8), mask=inside)
    tl.store(hard_ptr + row + idx, hard.to(tl.uint8), mask=inside)
    tl.store(restore_ptr + row + idx, position, mask=inside)
    tl.store(shuffle_ptr + row + position, idx.to(tl.int64), mask=inside)


@kernel_op("anatomask_fast::anatomical_mask_triton")
def anatomical_mask_triton(
    errors: torch.Tensor,
    noise: torch.Tensor | None,
    len_keep: int,
    n_hard: int,
    seed: int,
    offset: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_selection("anatomical_mask", errors, noise, len_keep, n_hard, seed, offset)
    B, L = errors.shape
    # Errors are not read without hard patches (random_mask passes an expanded zero).
    errors = errors.contiguous() if n_hard > 0 else errors
    noise = noise.contiguous() if noise is not None else None
    active = new_output((B, L), dtype=torch.bool, device=errors.device)
    hard = new_output((B, L), dtype=torch.bool, device=errors.device)
    shuffle = new_output((B, L), dtype=torch.int64, device=errors.device)
    restore = new_output((B, L), dtype=torch.int64, device=errors.device)
    block = triton.next_power_of_2(L)
    launchable(_anatomical_mask_kernel)[(B,)](
        errors,
        errors if noise is None else noise,
        active.view(torch.uint8),
        hard.view(torch.uint8),
        shuffle,
        restore,
        L,
        len_keep,
        n_hard,
        seed,
        offset,
        HAS_NOISE=noise is not None,
        BLOCK=block,
        num_warps=min(16, max(4, block // 512)),
    )
    return active, hard, shuffle, restore

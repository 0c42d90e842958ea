"""Inputs and comparisons shared by the token ops' tests (gather_tokens,
scatter_tokens): MAE's ids from a random shuffle."""

from __future__ import annotations

import torch

from .helpers import TOLERANCES

SHAPES = [(2, 10, 5, 4), (1, 7, 1, 7), (3, 9, 33, 1), (2, 6, 3, 0)]  # (B, L, C, len_keep)


def shuffle(batch: int, length: int, keep: int, gen: torch.Generator, device: str):
    ids_shuffle = torch.rand(batch, length, generator=gen).argsort(dim=1)
    return ids_shuffle[:, :keep].to(device), ids_shuffle.argsort(dim=1).to(device)


def leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def compare(out, expected, mine, ref, dtype):
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected.double(), **TOLERANCES[dtype])
    for a, b in zip(mine, ref):
        if a is not None:
            torch.testing.assert_close(a.grad.double(), b.grad.double(), **TOLERANCES[dtype])

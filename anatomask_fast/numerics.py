"""Numeric conventions that every backend of every op shares: the dtype reductions
accumulate in, and the activations ``sparse_norm`` fuses. One definition each; the C++
kernels follow the same rules (csrc/checks.h, csrc/cpu/gather_scatter.cpp)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of sums, statistics and the tables a kernel returns for inputs of
    ``dtype``: fp32, fp64 for fp64 inputs (half-precision sums would lose their low
    bits; fp64 inputs keep their precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# The activations sparse_norm fuses: name -> (the code the Triton kernels take as ACT,
# the formula). LeakyReLU has nnU-Net's slope 0.01; ReLU6 is SparK's decoder's.
ACTIVATIONS: dict[str, tuple[int, Callable[[torch.Tensor], torch.Tensor]]] = {
    "none": (0, lambda t: t),
    "leaky_relu": (1, lambda t: F.leaky_relu(t, 0.01)),
    "relu6": (2, F.relu6),
}

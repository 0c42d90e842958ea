"""Gather/scatter family: moving data around the visible mask, in the volumetric
layout (B, C, H, W, D) with a low-resolution mask (B, 1, h, w, d) and in the token
layout (B, L, C) with MAE's ``ids_keep`` / ``ids_restore``."""

from __future__ import annotations

import torch

from .. import _extension, autograd
from ..contracts import check_activation, check_ids_values
from ..dispatch import Op
from ..numerics import accumulation_dtype
from ..reference.gather_scatter import (
    apply_mask_reference,
    densify_reference,
    gather_tokens_reference,
    scatter_tokens_reference,
    sparse_norm_reference,
)
from ..validation import (
    FLOAT_DTYPES,
    check_active_mask,
    check_eps,
    check_same_device,
    check_tensor,
    check_volume,
    register_fake,
)

# On a GPU: the Triton kernels of densify, sparse_norm and the token gather/scatter
# moved 1.3-2.2x more bytes per second than the CUDA C++ ones at STU-Net stage-0 size
# (H200, benchmarks/RESULTS.md); apply_mask's CUDA C++ kernel was the faster one.
TRITON_FIRST = ("triton", "cuda")
APPLY_MASK = Op(
    "apply_mask",
    reference=apply_mask_reference,
    cpp="apply_mask",
    triton="gather_scatter:apply_mask_triton",
)
DENSIFY = Op(
    "densify",
    reference=densify_reference,
    cpp="densify",
    triton="gather_scatter:densify_triton",
    cuda_preference=TRITON_FIRST,
)
SPARSE_NORM = Op(
    "sparse_norm",
    reference=sparse_norm_reference,
    cpp="sparse_norm",
    triton="gather_scatter:sparse_norm_triton",
    cuda_preference=TRITON_FIRST,
)
GATHER_TOKENS = Op(
    "gather_tokens",
    reference=gather_tokens_reference,
    cpp="gather_tokens",
    triton="gather_scatter:gather_tokens_triton",
    cuda_preference=TRITON_FIRST,
)
SCATTER_TOKENS = Op(
    "scatter_tokens",
    reference=scatter_tokens_reference,
    cpp="scatter_tokens",
    triton="gather_scatter:scatter_tokens_triton",
    cuda_preference=TRITON_FIRST,
)


def apply_mask(x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Zeroes the hidden patches of ``x`` (B, C, H, W, D) given the visible mask
    ``active`` (B, 1, h, w, d, bool, True = visible), without building the
    full-resolution mask. Differentiable in ``x``; hidden outputs are exactly zero."""
    check_volume("apply_mask", "x", x)
    check_active_mask("apply_mask", active, x)
    return APPLY_MASK(x.device)(x, active)


def _check_channels(
    op: str,
    name: str,
    value: object,
    channels: int,
    shapes: tuple[tuple[int, ...], ...],
    like: torch.Tensor,
) -> None:
    """A float per-channel parameter of one of ``shapes`` on ``like``'s device."""
    check_tensor(op, name, value, dtypes=FLOAT_DTYPES)
    if tuple(value.shape) not in shapes:
        expected = " or ".join(str(s) for s in shapes)
        raise ValueError(
            f"{op}: argument '{name}' must have shape {expected} (C={channels}), "
            f"got {tuple(value.shape)}"
        )
    check_same_device(op, x=like, **{name: value})


def densify(x: torch.Tensor, active: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """Features of ``x`` (B, C, H, W, D) at visible positions, the learned per-channel
    ``mask_token`` ((1, C, 1, 1, 1) or (C,)) at hidden ones, reading the (B, 1, h, w, d)
    mask directly. Output in ``x``'s dtype. Differentiable in ``x`` (zero at hidden
    positions) and ``mask_token`` (per channel, the sum over hidden positions)."""
    check_volume("densify", "x", x)
    check_active_mask("densify", active, x)
    C = x.shape[1]
    _check_channels("densify", "mask_token", mask_token, C, ((1, C, 1, 1, 1), (C,)), x)
    return DENSIFY(x.device)(x, active, mask_token)


def sparse_norm(
    x: torch.Tensor,
    active: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    per_sample: bool = False,
    eps: float = 1e-5,
    activation: str | None = None,
) -> torch.Tensor:
    """Normalization of ``x`` (B, C, H, W, D) with statistics over the visible voxels
    only (biased variance), optional affine ``weight``/``bias`` (C,), hidden outputs
    exactly zero, fused with ``activation`` (None, "leaky_relu" (slope 0.01) or
    "relu6"). ``per_sample=False`` pools each channel's statistics over the batch (the
    reference's quirk); ``per_sample=True`` gives instance statistics. Statistics and
    every reduction are in fp32 (fp64 for fp64 inputs); backward keeps the input and the
    per-channel mean and rstd only."""
    check_volume("sparse_norm", "x", x)
    check_active_mask("sparse_norm", active, x)
    C = x.shape[1]
    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None:
            _check_channels("sparse_norm", name, value, C, ((C,),), x)
    check_activation("sparse_norm", "none" if activation is None else activation)
    check_eps("sparse_norm", eps)
    backend = SPARSE_NORM.select(x.device)
    if backend == "reference":
        return sparse_norm_reference(
            x, active, weight, bias, per_sample=per_sample, eps=eps, activation=activation
        )
    return SPARSE_NORM.kernel(backend)(
        x, active, weight, bias, bool(per_sample), float(eps), activation or "none"
    )[0]


def _check_ids(op: str, name: str, ids: object, batch: int, like: torch.Tensor) -> torch.Tensor:
    check_tensor(op, name, ids, ndim=2, dtypes=(torch.int64,))
    if ids.shape[0] != batch:
        raise ValueError(
            f"{op}: argument '{name}' must have shape ({batch}, n), got {tuple(ids.shape)}"
        )
    check_same_device(op, x=like, **{name: ids})
    return ids


def _check_ids_values(
    op: str, name: str, ids: torch.Tensor, bound: int, *, permutation: bool
) -> None:
    """Values are checked on CPU tensors only: on a GPU the check would synchronize.
    There the CUDA kernels assert on the device and the Triton kernels skip ids out of
    range (see kernels/gather_scatter.py)."""
    if ids.device.type == "cpu":
        check_ids_values(op, name, ids, bound, permutation=permutation)


def gather_tokens(x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """The visible tokens ``(B, len_keep, C)`` of ``x`` (B, L, C): row
    ``ids_keep[b, k]`` (int64, distinct per sample, in [0, L)) of sample b.
    Differentiable in ``x`` (zero at the tokens not kept)."""
    check_tensor("gather_tokens", "x", x, ndim=3, dtypes=FLOAT_DTYPES)
    B, L, _ = x.shape
    _check_ids("gather_tokens", "ids_keep", ids_keep, B, x)
    if ids_keep.shape[1] > L:
        raise ValueError(
            f"gather_tokens: argument 'ids_keep' must have at most L={L} "
            f"columns, got {tuple(ids_keep.shape)}"
        )
    _check_ids_values("gather_tokens", "ids_keep", ids_keep, L, permutation=False)
    return GATHER_TOKENS(x.device)(x, ids_keep)


def scatter_tokens(
    x_visible: torch.Tensor,
    ids_restore: torch.Tensor,
    mask_token: torch.Tensor,
    pos_embed: torch.Tensor | None = None,
) -> torch.Tensor:
    """The full sequence ``(B, L, C)`` from the visible tokens ``x_visible``
    (B, len_keep, C): slot l of sample b holds ``x_visible[b, r]`` if
    ``r = ids_restore[b, l] < len_keep``, else ``mask_token`` ((1, 1, C) or (C,)), plus
    ``pos_embed[l]`` ((1, L, C) or (L, C)) when given, in one pass. ``ids_restore`` is
    int64 (B, L), a permutation of [0, L) per sample (MAE's argsort of the shuffle).
    Output in ``x_visible``'s dtype. Differentiable in ``x_visible``, ``mask_token``
    (the sum over hidden slots) and ``pos_embed``."""
    op = "scatter_tokens"
    check_tensor(op, "x_visible", x_visible, ndim=3, dtypes=FLOAT_DTYPES)
    B, K, C = x_visible.shape
    _check_ids(op, "ids_restore", ids_restore, B, x_visible)
    L = ids_restore.shape[1]
    if L < K:
        raise ValueError(
            f"{op}: argument 'ids_restore' must have L >= len_keep={K} columns, "
            f"got {tuple(ids_restore.shape)}"
        )
    _check_channels(op, "mask_token", mask_token, C, ((1, 1, C), (C,)), x_visible)
    if pos_embed is not None:
        _check_channels(op, "pos_embed", pos_embed, C, ((1, L, C), (L, C)), x_visible)
    _check_ids_values(op, "ids_restore", ids_restore, L, permutation=True)
    return SCATTER_TOKENS(x_visible.device)(x_visible, ids_restore, mask_token, pos_embed)


def _register_fakes() -> None:
    """Fake (meta) kernels of the C++ operators (triton_op derives its own)."""
    ns = "anatomask_fast::"

    @register_fake(f"{ns}apply_mask")
    def _(x, active):
        return x.new_empty(x.shape)

    @register_fake(f"{ns}densify")
    def _(x, active, mask_token):
        return x.new_empty(x.shape)

    @register_fake(f"{ns}densify_backward")
    def _(grad, active):
        return grad.new_empty(grad.shape), grad.new_empty(
            (grad.shape[1],), dtype=accumulation_dtype(grad.dtype)
        )

    @register_fake(f"{ns}sparse_norm")
    def _(x, active, weight, bias, per_sample, eps, activation):
        stats = (x.shape[0] if per_sample else 1, x.shape[1])
        acc = accumulation_dtype(x.dtype)
        return x.new_empty(x.shape), x.new_empty(stats, dtype=acc), x.new_empty(stats, dtype=acc)

    @register_fake(f"{ns}sparse_norm_backward")
    def _(grad, x, active, weight, bias, mean, rstd, activation):
        acc, C = accumulation_dtype(x.dtype), x.shape[1]
        return x.new_empty(x.shape), x.new_empty((C,), dtype=acc), x.new_empty((C,), dtype=acc)

    @register_fake(f"{ns}gather_tokens")
    def _(x, ids_keep):
        return x.new_empty((x.shape[0], ids_keep.shape[1], x.shape[2]))

    @register_fake(f"{ns}gather_tokens_backward")
    def _(grad, ids_keep, length):
        return grad.new_empty((grad.shape[0], length, grad.shape[2]))

    @register_fake(f"{ns}scatter_tokens")
    def _(x_visible, ids_restore, mask_token, pos_embed):
        return x_visible.new_empty((x_visible.shape[0], ids_restore.shape[1], x_visible.shape[2]))

    @register_fake(f"{ns}scatter_tokens_backward")
    def _(grad, ids_restore, len_keep, with_pos):
        B, L, C = grad.shape
        acc = accumulation_dtype(grad.dtype)
        return (
            grad.new_empty((B, len_keep, C)),
            grad.new_empty((C,), dtype=acc),
            grad.new_empty((L if with_pos else 0, C), dtype=acc),
        )


def _register_cpp() -> None:
    """Fake kernels and autograd for the C++ operators (schemas in csrc/ops.cpp)."""
    _register_fakes()
    autograd.register_cpp(autograd.gather_scatter)


if _extension.load()[0] is not None:
    _register_cpp()

"""Gather/scatter family: moving data around the visible mask, in the volumetric
layout (B, C, H, W, D) with a low-resolution mask (B, 1, h, w, d) and in the token
layout (B, L, C) with MAE's ``ids_keep`` / ``ids_restore``."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import _extension
from ..dispatch import Op
from ..reference.gather_scatter import (ACTIVATIONS, apply_mask_reference, densify_reference,
                                        gather_tokens_reference, scatter_tokens_reference,
                                        sparse_norm_reference)
from ..validation import (FLOAT_DTYPES, check_active_mask, check_eps, check_same_device,
                          check_tensor, check_volume, register_fake)

# On a GPU: the Triton kernels of densify, sparse_norm and the token gather/scatter
# moved 1.3-2.2x more bytes per second than the CUDA C++ ones at STU-Net stage-0 size
# (H200, benchmarks/RESULTS.md); apply_mask's CUDA C++ kernel was the faster one.
TRITON_FIRST = ("triton", "cuda")
APPLY_MASK = Op("apply_mask", reference=apply_mask_reference, cpp="apply_mask",
                triton="gather_scatter:apply_mask_triton")
DENSIFY = Op("densify", reference=densify_reference, cpp="densify",
             triton="gather_scatter:densify_triton", cuda_preference=TRITON_FIRST)
SPARSE_NORM = Op("sparse_norm", reference=sparse_norm_reference, cpp="sparse_norm",
                 triton="gather_scatter:sparse_norm_triton", cuda_preference=TRITON_FIRST)
GATHER_TOKENS = Op("gather_tokens", reference=gather_tokens_reference, cpp="gather_tokens",
                   triton="gather_scatter:gather_tokens_triton", cuda_preference=TRITON_FIRST)
SCATTER_TOKENS = Op("scatter_tokens", reference=scatter_tokens_reference, cpp="scatter_tokens",
                    triton="gather_scatter:scatter_tokens_triton", cuda_preference=TRITON_FIRST)


def apply_mask(x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Zeroes the hidden patches of ``x`` (B, C, H, W, D) given the visible mask
    ``active`` (B, 1, h, w, d, bool, True = visible), without building the
    full-resolution mask. Differentiable in ``x``; hidden outputs are exactly zero."""
    check_volume("apply_mask", "x", x)
    check_active_mask("apply_mask", active, x)
    return APPLY_MASK(x.device)(x, active)


def _check_channels(op: str, name: str, value: object, channels: int,
                    shapes: tuple[tuple[int, ...], ...], like: torch.Tensor) -> None:
    """A float per-channel parameter of one of ``shapes`` on ``like``'s device."""
    check_tensor(op, name, value, dtypes=FLOAT_DTYPES)
    if tuple(value.shape) not in shapes:
        expected = " or ".join(str(s) for s in shapes)
        raise ValueError(f"{op}: argument '{name}' must have shape {expected} (C={channels}), "
                         f"got {tuple(value.shape)}")
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


def sparse_norm(x: torch.Tensor, active: torch.Tensor, weight: torch.Tensor | None,
                bias: torch.Tensor | None, *, per_sample: bool = False, eps: float = 1e-5,
                activation: str | None = None) -> torch.Tensor:
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
    if activation not in ACTIVATIONS:
        raise ValueError(f"sparse_norm: argument 'activation' must be one of "
                         f"{tuple(ACTIVATIONS)}, got {activation!r}")
    check_eps("sparse_norm", eps)
    backend = SPARSE_NORM.select(x.device)
    if backend == "reference":
        return sparse_norm_reference(x, active, weight, bias, per_sample=per_sample, eps=eps,
                                     activation=activation)
    return SPARSE_NORM.kernel(backend)(x, active, weight, bias, bool(per_sample), float(eps),
                                       activation or "none")[0]


def _check_ids(op: str, name: str, ids: object, batch: int, like: torch.Tensor) -> torch.Tensor:
    check_tensor(op, name, ids, ndim=2, dtypes=(torch.int64,))
    if ids.shape[0] != batch:
        raise ValueError(f"{op}: argument '{name}' must have shape ({batch}, n), got "
                         f"{tuple(ids.shape)}")
    check_same_device(op, x=like, **{name: ids})
    return ids


def _check_ids_values(op: str, name: str, ids: torch.Tensor, bound: int, *,
                      permutation: bool) -> None:
    """Values are checked on CPU tensors only: on a GPU the check would synchronize.
    There the CUDA kernels assert on the device and the Triton kernels skip ids out of
    range (see kernels/gather_scatter.py). Under torch.compile the C++ CPU kernels make
    the same checks."""
    if ids.device.type != "cpu" or ids.numel() == 0 or torch.compiler.is_compiling():
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= bound:
        raise ValueError(f"{op}: argument '{name}' must hold indices in [0, {bound}), got "
                         f"values in [{low}, {high}]")
    ordered = ids.sort(dim=1).values
    if permutation and not torch.equal(ordered, torch.arange(bound).expand_as(ordered)):
        raise ValueError(f"{op}: argument '{name}' must be a permutation of [0, {bound}) "
                         "per sample")
    if not permutation and bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        raise ValueError(f"{op}: argument '{name}' must hold distinct indices per sample")


def gather_tokens(x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """The visible tokens ``(B, len_keep, C)`` of ``x`` (B, L, C): row
    ``ids_keep[b, k]`` (int64, distinct per sample, in [0, L)) of sample b.
    Differentiable in ``x`` (zero at the tokens not kept)."""
    check_tensor("gather_tokens", "x", x, ndim=3, dtypes=FLOAT_DTYPES)
    B, L, _ = x.shape
    _check_ids("gather_tokens", "ids_keep", ids_keep, B, x)
    if ids_keep.shape[1] > L:
        raise ValueError(f"gather_tokens: argument 'ids_keep' must have at most L={L} "
                         f"columns, got {tuple(ids_keep.shape)}")
    _check_ids_values("gather_tokens", "ids_keep", ids_keep, L, permutation=False)
    return GATHER_TOKENS(x.device)(x, ids_keep)


def scatter_tokens(x_visible: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                   pos_embed: torch.Tensor | None = None) -> torch.Tensor:
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
        raise ValueError(f"{op}: argument 'ids_restore' must have L >= len_keep={K} columns, "
                         f"got {tuple(ids_restore.shape)}")
    _check_channels(op, "mask_token", mask_token, C, ((1, 1, C), (C,)), x_visible)
    if pos_embed is not None:
        _check_channels(op, "pos_embed", pos_embed, C, ((1, L, C), (L, C)), x_visible)
    _check_ids_values(op, "ids_restore", ids_restore, L, permutation=True)
    return SCATTER_TOKENS(x_visible.device)(x_visible, ids_restore, mask_token, pos_embed)


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype kernels accumulate and return reductions in."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _cast_like(grad: torch.Tensor, like: torch.Tensor | None) -> torch.Tensor | None:
    """A per-parameter gradient in the parameter's shape and dtype."""
    return None if like is None else grad.reshape(like.shape).to(like.dtype)


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
        return grad.new_empty(grad.shape), grad.new_empty((grad.shape[1],), dtype=_acc_dtype(grad))

    @register_fake(f"{ns}sparse_norm")
    def _(x, active, weight, bias, per_sample, eps, activation):
        stats = (x.shape[0] if per_sample else 1, x.shape[1])
        acc = _acc_dtype(x)
        return x.new_empty(x.shape), x.new_empty(stats, dtype=acc), x.new_empty(stats, dtype=acc)

    @register_fake(f"{ns}sparse_norm_backward")
    def _(grad, x, active, weight, bias, mean, rstd, activation):
        acc, C = _acc_dtype(x), x.shape[1]
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
        acc = _acc_dtype(grad)
        return (grad.new_empty((B, len_keep, C)), grad.new_empty((C,), dtype=acc),
                grad.new_empty((L if with_pos else 0, C), dtype=acc))


def register_autograd(ops: Any, register: Callable[[str, Callable, Callable], None]) -> None:
    """Autograd of one backend's forward operators (the C++ ones, or the Triton ones):
    ``ops.densify_backward`` etc. are its backward operators, and
    ``register(name, backward, setup_context)`` attaches the formulas to forward ``name``."""

    def setup_apply_mask(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[1])

    def apply_mask_backward(ctx, grad):
        (active,) = ctx.saved_tensors
        return ops.apply_mask(grad, active), None

    def setup_densify(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[1], inputs[2])

    def densify_backward(ctx, grad):
        active, token = ctx.saved_tensors
        grad_x, grad_token = ops.densify_backward(grad, active)
        return grad_x, None, _cast_like(grad_token, token)

    def setup_sparse_norm(ctx, inputs, output) -> None:
        x, active, weight, bias, _, _, activation = inputs
        _, mean, rstd = output
        ctx.activation = activation
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, active, weight, bias, mean, rstd)

    def sparse_norm_backward(ctx, grad, _grad_mean, _grad_rstd):
        x, active, weight, bias, mean, rstd = ctx.saved_tensors
        grad_x, grad_w, grad_b = ops.sparse_norm_backward(grad, x, active, weight, bias, mean,
                                                          rstd, ctx.activation)
        return (grad_x, None, _cast_like(grad_w, weight), _cast_like(grad_b, bias),
                None, None, None)

    def setup_gather_tokens(ctx, inputs, output) -> None:
        ctx.length = inputs[0].shape[1]
        ctx.save_for_backward(inputs[1])

    def gather_tokens_backward(ctx, grad):
        (ids_keep,) = ctx.saved_tensors
        return ops.gather_tokens_backward(grad, ids_keep, ctx.length), None

    def setup_scatter_tokens(ctx, inputs, output) -> None:
        x_visible, ids_restore, token, pos = inputs
        ctx.len_keep = x_visible.shape[1]
        ctx.save_for_backward(ids_restore, token, pos)

    def scatter_tokens_backward(ctx, grad):
        ids_restore, token, pos = ctx.saved_tensors
        grad_x, grad_token, grad_pos = ops.scatter_tokens_backward(
            grad, ids_restore, ctx.len_keep, pos is not None)
        return grad_x, None, _cast_like(grad_token, token), _cast_like(grad_pos, pos)

    for name, backward, setup in (
            ("apply_mask", apply_mask_backward, setup_apply_mask),
            ("densify", densify_backward, setup_densify),
            ("sparse_norm", sparse_norm_backward, setup_sparse_norm),
            ("gather_tokens", gather_tokens_backward, setup_gather_tokens),
            ("scatter_tokens", scatter_tokens_backward, setup_scatter_tokens)):
        register(name, backward, setup)


def _register_cpp() -> None:
    """Fake kernels and autograd for the C++ operators (schemas in csrc/ops.cpp)."""
    _register_fakes()
    register_autograd(torch.ops.anatomask_fast, lambda name, backward, setup: (
        torch.library.register_autograd(f"anatomask_fast::{name}", backward,
                                        setup_context=setup)))


if _extension.load()[0] is not None:
    _register_cpp()

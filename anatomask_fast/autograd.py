"""The backward formulas of the compiled operators, written once for both compiled
backends. Each family function takes ``ops`` (the backend's operators by their plain
names: ``torch.ops.anatomask_fast`` for C++, the ``*_triton`` operators for Triton) and
``register(name, backward, setup_context)``, and attaches every forward operator's
backward, expressed with that backend's backward operators. What is saved is the
least the backward needs (inputs and per-channel or per-patch statistics, never an
activation the kernels can recompute)."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch

Register = Callable[[str, Callable, Callable], None]


def _cast_like(grad: torch.Tensor, like: torch.Tensor | None) -> torch.Tensor | None:
    """A per-parameter gradient in the parameter's shape and dtype (the kernels return
    it in the accumulation dtype)."""
    return None if like is None else grad.reshape(like.shape).to(like.dtype)


def gather_scatter(ops: Any, register: Register) -> None:
    """apply_mask, densify, sparse_norm, gather_tokens, scatter_tokens."""

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
        grad_x, grad_w, grad_b = ops.sparse_norm_backward(
            grad, x, active, weight, bias, mean, rstd, ctx.activation
        )
        return (
            grad_x,
            None,
            _cast_like(grad_w, weight),
            _cast_like(grad_b, bias),
            None,
            None,
            None,
        )

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
            grad, ids_restore, ctx.len_keep, pos is not None
        )
        return grad_x, None, _cast_like(grad_token, token), _cast_like(grad_pos, pos)

    register("apply_mask", apply_mask_backward, setup_apply_mask)
    register("densify", densify_backward, setup_densify)
    register("sparse_norm", sparse_norm_backward, setup_sparse_norm)
    register("gather_tokens", gather_tokens_backward, setup_gather_tokens)
    register("scatter_tokens", scatter_tokens_backward, setup_scatter_tokens)


def packing(ops: Any, register: Register) -> None:
    """pack_patches and unpack_patches are each other's adjoint, as are pad_halo and
    pad_halo_backward (so each is the other's backward)."""

    def save_layout(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[1], inputs[2])

    def pack_backward(ctx, grad):
        patches, slots = ctx.saved_tensors
        return ops.unpack_patches(grad, patches, slots), None, None

    def unpack_backward(ctx, grad):
        patches, slots = ctx.saved_tensors
        return ops.pack_patches(grad, patches, slots), None, None

    def save_halo(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[1])
        ctx.lo, ctx.hi = inputs[2], inputs[3]

    def halo_backward(ctx, grad):
        (neighbours,) = ctx.saved_tensors
        return ops.pad_halo_backward(grad, neighbours, ctx.lo, ctx.hi), None, None, None

    def halo_double_backward(ctx, grad):
        (neighbours,) = ctx.saved_tensors
        return ops.pad_halo(grad, neighbours, ctx.lo, ctx.hi), None, None, None

    register("pack_patches", pack_backward, save_layout)
    register("unpack_patches", unpack_backward, save_layout)
    register("pad_halo", halo_backward, save_halo)
    register("pad_halo_backward", halo_double_backward, save_halo)


def patch_loss(ops: Any, register: Register) -> None:
    """patch_recon_loss (rec, x, active, norm_pix, eps, hidden_only) -> (per_patch,
    mean, rstd): only the inputs and the (B, L) statistics are saved; raw targets come
    with mean 0 and rstd 1. Gradients flow to ``rec`` only (``x`` is data)."""

    def setup_context(ctx, inputs, output) -> None:
        rec, x, active, _, _, hidden_only = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(rec, x, active, mean, rstd)
        ctx.hidden_only = hidden_only

    def backward(ctx, grad_per_patch, _grad_mean, _grad_rstd):
        rec, x, active, mean, rstd = ctx.saved_tensors
        grad = ops.patch_recon_loss_backward(
            grad_per_patch, rec, x, active, mean, rstd, ctx.hidden_only
        )
        return grad, None, None, None, None, None

    register("patch_recon_loss", backward, setup_context)


def seg_loss(ops: Any, register: Register) -> None:
    """dice_ce_loss (logits, labels, ignore_index) -> (class_sums, ce_sums): only the
    logits and labels are saved, the softmax is recomputed in backward."""

    def setup_context(ctx, inputs, output) -> None:
        logits, labels, ignore_index = inputs
        ctx.save_for_backward(logits, labels)
        ctx.ignore_index = ignore_index

    def backward(ctx, grad_class_sums: torch.Tensor, grad_ce_sums: torch.Tensor):
        logits, labels = ctx.saved_tensors
        return (
            ops.dice_ce_loss_backward(
                grad_class_sums, grad_ce_sums, logits, labels, ctx.ignore_index
            ),
            None,
            None,
        )

    register("dice_ce_loss", backward, setup_context)


def register_cpp(family: Callable[[Any, Register], None]) -> None:
    """``family``'s formulas on the C++ operators (schemas in csrc/ops.cpp)."""
    family(
        torch.ops.anatomask_fast,
        lambda name, backward, setup: torch.library.register_autograd(
            f"anatomask_fast::{name}", backward, setup_context=setup
        ),
    )


def register_triton(family: Callable[[Any, Register], None], namespace: dict[str, Any]) -> None:
    """``family``'s formulas on the ``*_triton`` operators found in ``namespace`` (a
    kernel module's globals)."""
    ops = SimpleNamespace(
        **{
            name.removesuffix("_triton"): value
            for name, value in namespace.items()
            if name.endswith("_triton")
        }
    )
    family(
        ops,
        lambda name, backward, setup: getattr(ops, name).register_autograd(
            backward, setup_context=setup
        ),
    )

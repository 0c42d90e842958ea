"""The argument contracts of the raw operators, in Python: what the Triton operators
(``torch.ops.anatomask_fast.*_triton``) check before a kernel reads memory, as the C++
operators do in csrc/checks.h and the family headers, and the index-value checks the
public API runs for the reference backend. Every error names the op, the argument,
what was expected and what came. Data-dependent checks are host-side for CPU tensors
and device-side assertions elsewhere (see ``validation.require``)."""

from __future__ import annotations

import torch

from .numerics import ACTIVATIONS, accumulation_dtype
from .validation import (
    FLOAT_DTYPES,
    check_active_mask,
    check_index_values,
    check_same_device,
    check_tensor,
    check_volume,
    data_known,
    require,
)

INDEX = (torch.int64,)
LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


def check_like(op: str, name: str, value: object, like: torch.Tensor, like_name: str) -> None:
    """``value`` a tensor of ``like``'s shape, dtype and device."""
    check_tensor(op, name, value)
    if value.shape != like.shape:
        raise ValueError(
            f"{op}: argument '{name}' must have the shape of '{like_name}' "
            f"{tuple(like.shape)}, got {tuple(value.shape)}"
        )
    if value.dtype != like.dtype:
        raise TypeError(
            f"{op}: argument '{name}' must have the dtype of '{like_name}' "
            f"({like.dtype}), got {value.dtype}"
        )
    check_same_device(op, **{like_name: like, name: value})


def check_table(
    op: str,
    name: str,
    value: object,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    like: torch.Tensor,
    like_name: str,
) -> None:
    """A (statistics or gradient) table of ``shape`` and ``dtype`` on ``like``'s device."""
    check_tensor(op, name, value, dtypes=(dtype,))
    if tuple(value.shape) != tuple(shape):
        raise ValueError(
            f"{op}: argument '{name}' must have shape {tuple(shape)}, got {tuple(value.shape)}"
        )
    check_same_device(op, **{like_name: like, name: value})


def check_param(
    op: str, name: str, value: object, numel: int, like: torch.Tensor, like_name: str = "x"
) -> None:
    """A float parameter of ``numel`` values on ``like``'s device."""
    check_tensor(op, name, value, dtypes=FLOAT_DTYPES)
    if value.numel() != numel:
        raise ValueError(
            f"{op}: argument '{name}' must have {numel} values, got shape {tuple(value.shape)}"
        )
    check_same_device(op, **{like_name: like, name: value})


def check_length(op: str, name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"{op}: argument '{name}' must be an int, got {type(value).__name__}")
    if isinstance(value, torch.SymInt):  # traced with dynamic shapes: checked when run
        return value
    if value < low or (high is not None and value > high):
        bound = "" if high is None else f", {high}]"
        raise ValueError(
            f"{op}: argument '{name}' must lie in [{low}{bound or ', inf)'}, got {value}"
        )
    return value


# ---- packing ----


def check_layout(op: str, patches: object, slots: object, batch: int | None) -> None:
    """``patches`` (N,) and ``slots`` (B, h, w, d), int64 (shapes only)."""
    check_tensor(op, "patches", patches, ndim=1, dtypes=INDEX)
    check_tensor(op, "slots", slots, ndim=4, dtypes=INDEX)
    if batch is not None and slots.shape[0] != batch:
        raise ValueError(
            f"{op}: argument 'slots' must have batch {batch} (B, h, w, d), "
            f"got shape {tuple(slots.shape)}"
        )


def check_pack(op: str, x: object, patches: object, slots: object) -> None:
    check_volume(op, "x", x)
    check_layout(op, patches, slots, x.shape[0])
    grid, spatial = tuple(slots.shape[1:]), tuple(x.shape[2:])
    if any(g <= 0 or s % g for g, s in zip(grid, spatial)):
        raise ValueError(
            f"{op}: the grid {grid} of 'slots' must divide the spatial shape {spatial} of 'x'"
        )
    check_same_device(op, x=x, patches=patches, slots=slots)


def check_unpack(op: str, packed: object, patches: object, slots: object) -> None:
    check_volume(op, "packed", packed)
    check_layout(op, patches, slots, None)
    if patches.shape[0] != packed.shape[0]:
        raise ValueError(
            f"{op}: argument 'patches' must have {packed.shape[0]} "
            f"entries (one per packed patch), got {patches.shape[0]}"
        )
    check_same_device(op, packed=packed, patches=patches, slots=slots)


def check_halo(
    op: str, name: str, tensor: object, neighbours: object, lo: object, hi: object, *, padded: bool
) -> None:
    """``tensor`` (N, C, ...) (its patches already ``padded`` by the halo or not),
    ``neighbours`` (N, 27), halo widths in [0, the unpadded patch side]."""
    check_volume(op, name, tensor)
    check_tensor(op, "neighbours", neighbours, ndim=2, dtypes=INDEX)
    if tuple(neighbours.shape) != (tensor.shape[0], 27):
        raise ValueError(
            f"{op}: argument 'neighbours' must have shape "
            f"({tensor.shape[0]}, 27), got {tuple(neighbours.shape)}"
        )
    widths = lo + hi if padded and all(isinstance(v, int) for v in (lo, hi)) else 0
    bound = min(tensor.shape[2:]) - widths
    for arg, value in (("lo", lo), ("hi", hi)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= bound:
            raise ValueError(
                f"{op}: argument '{arg}' must be an int in [0, {bound}] "
                f"(at most the patch side), got {value!r}"
            )
    check_same_device(op, **{name: tensor}, neighbours=neighbours)


def check_layout_values(op: str, patches: torch.Tensor, slots: torch.Tensor) -> None:
    """The layout contract (csrc/packing.h check_layout_values): ``slots[patches[n]] =
    n`` for every n and -1 at every other cell, as ``MaskLayout`` builds them; then
    every backend reads the same cells, whichever of the two it indexes by."""
    N, cells = patches.numel(), slots.numel()
    check_index_values(
        op,
        "patches",
        patches,
        0,
        cells,
        f"the {cells} cells of the {list(slots.shape)} grid of 'slots'",
    )
    check_index_values(op, "slots", slots, -1, N, f"the {N} packed patches (or -1 where hidden)")
    if cells == 0 or not data_known(patches, slots):
        return
    flat = slots.reshape(-1)
    order = torch.arange(N, device=slots.device)
    agree = (flat[patches.clamp(0, cells - 1)] == order).all() & ((flat >= 0).sum() == N)
    require(
        agree,
        f"{op}: arguments 'patches' and 'slots' disagree: slots must hold n at "
        "cell patches[n] and -1 at every other cell",
    )


def check_neighbour_values(op: str, neighbours: torch.Tensor) -> None:
    """csrc/packing.h check_neighbour_values: indices in [-1, N), symmetric as a
    grid's (the adjoint reads the table backwards): ``neighbours[n, o] = m >= 0``
    implies ``neighbours[m, 26 - o] = n``."""
    N = neighbours.shape[0]
    check_index_values(
        op, "neighbours", neighbours, -1, N, f"the {N} packed patches (or -1 for zeros)"
    )
    if N == 0 or not data_known(neighbours):
        return
    back = (26 - torch.arange(27, device=neighbours.device)).expand_as(neighbours)
    mirrored = neighbours[neighbours.clamp(0, N - 1), back]
    own = torch.arange(N, device=neighbours.device)[:, None]
    require(
        ((neighbours < 0) | (mirrored == own)).all(),
        f"{op}: argument 'neighbours' must be symmetric (neighbours[n, o] = m implies "
        "neighbours[m, 26 - o] = n)",
    )


# ---- volumes with a visible mask ----


def check_masked(op: str, x: object, active: object, name: str = "x") -> tuple[int, int, int]:
    """A float (B, C, H, W, D) ``x`` and its bool (B, 1, h, w, d) mask; the cell size."""
    check_volume(op, name, x)
    return check_active_mask(op, active, x, like_name=name)


def check_activation(op: str, activation: object) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"{op}: argument 'activation' must be one of {tuple(ACTIVATIONS)}, got {activation!r}"
        )


def check_affine(op: str, x: torch.Tensor, weight: object, bias: object) -> None:
    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None:
            check_param(op, name, value, x.shape[1], x)


def check_norm_backward(op: str, grad: object, x: torch.Tensor, mean: object, rstd: object) -> None:
    """sparse_norm_backward's ``grad`` (like ``x``) and the forward's statistics
    ((1, C) pooled or (B, C) per sample, in the accumulation dtype)."""
    check_like(op, "grad", grad, x, "x")
    B, C = x.shape[:2]
    check_tensor(op, "mean", mean)
    if mean.dim() != 2 or mean.shape[0] not in (1, B) or mean.shape[1] != C:
        raise ValueError(
            f"{op}: argument 'mean' must have shape (1, C={C}) or (B={B}, C={C}), "
            f"got {tuple(mean.shape)}"
        )
    for name, value in (("mean", mean), ("rstd", rstd)):
        check_table(op, name, value, tuple(mean.shape), accumulation_dtype(x.dtype), x, "x")


def check_patch_loss(op: str, rec: object, x: object, active: object) -> None:
    check_masked(op, x, active)
    check_like(op, "rec", rec, x, "x")


def check_patch_tables(op: str, x: torch.Tensor, active: torch.Tensor, **tables: object) -> None:
    """The (B, L) per-patch tables a patch-loss backward receives."""
    shape = (active.shape[0], active[0].numel())
    for name, value in tables.items():
        check_table(op, name, value, shape, accumulation_dtype(x.dtype), x, "x")


# ---- token layout ----


def check_token_ids(
    op: str, ids: object, tokens: object, ids_name: str, tokens_name: str, width: int | None = None
) -> None:
    """Float tokens (B, n, C) and their int64 ids (B, m), m == ``width`` if given."""
    check_tensor(op, tokens_name, tokens, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor(op, ids_name, ids, ndim=2, dtypes=INDEX)
    if ids.shape[0] != tokens.shape[0] or (width is not None and ids.shape[1] != width):
        raise ValueError(
            f"{op}: argument '{ids_name}' must have shape (B={tokens.shape[0]}, "
            f"{'n' if width is None else width}), got {tuple(ids.shape)}"
        )
    check_same_device(op, **{tokens_name: tokens, ids_name: ids})


def check_ids_values(
    op: str, name: str, ids: torch.Tensor, bound: int, *, permutation: bool
) -> None:
    """Ids in [0, bound), distinct per sample, or each row a permutation of [0, bound)."""
    check_index_values(op, name, ids, 0, bound, f"the L={bound} tokens of each sample")
    if ids.numel() == 0 or not data_known(ids):
        return
    ordered = ids.clamp(0, bound - 1).sort(dim=1).values
    if permutation:
        require(
            (ordered == torch.arange(bound, device=ids.device)).all(),
            f"{op}: argument '{name}' must be a permutation of [0, {bound}) per sample",
        )
    else:
        require(
            ~(ordered[:, 1:] == ordered[:, :-1]).any(),
            f"{op}: argument '{name}' must hold distinct indices per sample",
        )


# ---- mask selection and segmentation loss ----


def check_selection(
    op: str, errors: object, noise: object, len_keep: int, n_hard: int, seed: int, offset: int
) -> None:
    """csrc/mask_select.h check_args."""
    check_tensor(
        op, "errors", errors, ndim=2, dtypes=(torch.float32, torch.float16, torch.bfloat16)
    )
    L = errors.shape[1]
    check_length(op, "len_keep", len_keep, 1, L - 1)
    check_length(op, "n_hard", n_hard, 0, L - len_keep)
    check_length(op, "seed", seed, 0)
    check_length(op, "offset", offset, 0)
    if noise is not None:
        check_table(op, "noise", noise, tuple(errors.shape), torch.float32, errors, "errors")


def check_seg_loss(op: str, logits: object, labels: object) -> None:
    """csrc/seg_loss.h seg_loss_geometry: logits (B, K, *spatial), labels (B, S)."""
    check_tensor(op, "logits", logits, dtypes=FLOAT_DTYPES)
    if logits.dim() < 3 or logits.shape[1] < 1:
        raise ValueError(
            f"{op}: argument 'logits' must be (B, K, H, W, D) with K >= 1, got "
            f"{tuple(logits.shape)}"
        )
    check_tensor(op, "labels", labels, dtypes=LABEL_DTYPES)
    B, S = logits.shape[0], logits[0, 0].numel()
    if tuple(labels.shape) != (B, S):
        raise ValueError(
            f"{op}: argument 'labels' must have shape (B={B}, S={S}) (the "
            f"flattened label map), got {tuple(labels.shape)}"
        )
    check_same_device(op, logits=logits, labels=labels)


def check_seg_loss_backward(
    op: str, grad_class_sums: object, grad_ce_sums: object, logits: torch.Tensor
) -> None:
    B, K = logits.shape[:2]
    for name, value, shape in (
        ("grad_class_sums", grad_class_sums, (B, 3, K)),
        ("grad_ce_sums", grad_ce_sums, (B,)),
    ):
        check_tensor(op, name, value, dtypes=FLOAT_DTYPES)
        if tuple(value.shape) != shape:
            raise ValueError(
                f"{op}: argument '{name}' must have shape {shape}, got {tuple(value.shape)}"
            )
        check_same_device(op, logits=logits, **{name: value})

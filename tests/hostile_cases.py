"""Hostile inputs for every op: out-of-range, inconsistent or mistyped arguments,
through the public API (under each CPU-reachable backend) and straight through
``torch.ops.anatomask_fast.*``. Each case names the error it must raise (type and a
pattern that names the argument); ``None`` means it must run and return.

The cases run in a separate process (tests/hostile_runner.py), since before the
fixes several of them crashed the interpreter (issue 19)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

import anatomask_fast as am
from anatomask_fast.models.layout import MaskLayout
from anatomask_fast.reference.packing import (
    pack_patches_reference,
    pad_halo_reference,
    unpack_patches_reference,
)

BIG = 1 << 40
# A comma-separated subset of the backends below (scripts/sanitize.sh: the C++ ones).
BACKENDS_ENV = "ANATOMASK_HOSTILE_BACKENDS"
# The C++ and the Python (Triton, public API) wording of a dtype error.
FLOAT = r"must (be float|have dtype in \(torch.float32)"
LONG = r"must (be Long|have dtype in \(torch.int64\))"
PUBLIC_BACKENDS = ("reference", "cpu", "triton")


@dataclass(frozen=True)
class Case:
    call: Callable[[], object]
    error: type[BaseException] | None  # None: must succeed
    match: str = ""  # regex the message must contain
    public: bool = True  # run under every backend of PUBLIC_BACKENDS


CASES: dict[str, Case] = {}


def case(
    name: str, error: type[BaseException] | None, match: str = "", *, public: bool = True
) -> Callable[[Callable[[], object]], Callable[[], object]]:
    def register(call: Callable[[], object]) -> Callable[[], object]:
        assert name not in CASES, name
        CASES[name] = Case(call, error, match, public)
        return call

    return register


def raw(name: str, error: type[BaseException] | None, match: str = ""):
    return case(f"raw.{name}", error, match, public=False)


class RawOps:
    """``torch.ops.anatomask_fast``, or its Triton twins (``<name>_triton``, the same
    schema) while ``suffix`` is "_triton"."""

    suffix = ""

    def __getattr__(self, name: str):
        return getattr(torch.ops.anatomask_fast, name + self.suffix)


ops = RawOps()
RAW_BACKENDS = {"cpp": "", "triton": "_triton"}


# ---- fixtures (small; built per call so that no case sees another's edits) ----


def layout(grid: tuple[int, int, int] = (2, 2, 2), batch: int = 1) -> MaskLayout:
    return MaskLayout.build(torch.ones(batch, 1, *grid, dtype=torch.bool), stages=1)


def with_value(t: torch.Tensor, index: int, value: int) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[index] = value
    return t


def volume() -> torch.Tensor:
    return torch.randn(1, 2, 8, 8, 8)


def packed() -> torch.Tensor:
    return torch.randn(8, 2, 4, 4, 4)


def halo_grad() -> torch.Tensor:
    return torch.randn(8, 2, 6, 6, 6)


def swapped_patches() -> torch.Tensor:
    """patches with entries 0 and 1 exchanged: slots no longer their inverse."""
    p = layout().patches.clone()
    p[[0, 1]] = p[[1, 0]]
    return p


def asymmetric_neighbours() -> torch.Tensor:
    """Patch 0 claims patch 1 as its +x neighbour, which patch 1 does not return."""
    nb = layout().neighbours.clone()
    nb[0, 22] = 3
    return nb


# ---- packing: public API (issue 19: crashes and garbage reads before) ----

# Each index argument at 1 << 40, at its bound and below 0, through the public API
# (every backend) and the raw operators (C++ and Triton).
for register, api in ((case, am), (raw, ops)):
    for label, value in (("1<<40", BIG), ("cells", 8), ("-1", -1)):
        register(
            f"pack_patches.patch={label}",
            ValueError,
            r"pack_patches: argument 'patches' must hold indices in \[0, 8\)",
        )(
            lambda value=value, api=api: api.pack_patches(
                volume(), with_value(layout().patches, 1, value), layout().slots
            )
        )
        register(
            f"unpack_patches.slot={label}",
            ValueError,
            r"unpack_patches: argument 'slots' must hold indices in \[-1, 8\)"
            if value != -1
            else r"unpack_patches: arguments 'patches' and 'slots' disagree",
        )(
            lambda value=value, api=api: api.unpack_patches(
                packed(), layout().patches, with_value(layout().slots, 3, value)
            )
        )
        for op, tensor in (("pad_halo", packed), ("pad_halo_backward", halo_grad)):
            bad = value if value != -1 else -2
            register(
                f"{op}.neighbour={label if value != -1 else '-2'}",
                ValueError,
                rf"{op}: argument 'neighbours' must hold indices in \[-1, 8\)",
            )(
                lambda op=op, tensor=tensor, bad=bad, api=api: getattr(api, op)(
                    tensor(), with_value(layout().neighbours, 5, bad), 1, 1
                )
            )

case(
    "pack_patches.patches_disagree_with_slots",
    ValueError,
    r"pack_patches: arguments 'patches' and 'slots' disagree",
)(lambda: am.pack_patches(volume(), swapped_patches(), layout().slots))
case(
    "unpack_patches.patches_disagree_with_slots",
    ValueError,
    r"unpack_patches: arguments 'patches' and 'slots' disagree",
)(lambda: am.unpack_patches(packed(), swapped_patches(), layout().slots))
case(
    "unpack_patches.extra_slot",
    ValueError,
    r"unpack_patches: arguments 'patches' and 'slots' disagree",
)(lambda: am.unpack_patches(packed()[:7], layout().patches[:7], with_value(layout().slots, 7, 0)))
case(
    "pad_halo.asymmetric_neighbours",
    ValueError,
    r"pad_halo: argument 'neighbours' must be symmetric",
)(lambda: am.pad_halo(packed(), asymmetric_neighbours(), 1, 1))
case(
    "pad_halo_backward.asymmetric_neighbours",
    ValueError,
    r"pad_halo_backward: argument 'neighbours' must be symmetric",
)(lambda: am.pad_halo_backward(halo_grad(), asymmetric_neighbours(), 1, 1))
case("pack_patches.patches_int32", TypeError, r"'patches' must have dtype in \(torch.int64\)")(
    lambda: am.pack_patches(volume(), layout().patches.int(), layout().slots)
)
case("pack_patches.x_int", TypeError, r"pack_patches: argument 'x' must have dtype")(
    lambda: am.pack_patches(volume().int(), layout().patches, layout().slots)
)
case("pack_patches.slots_on_meta", ValueError, r"argument 'slots' is on meta")(
    lambda: am.pack_patches(volume(), layout().patches, layout().slots.to("meta"))
)
case("pad_halo.neighbours_1d", ValueError, r"pad_halo: argument 'neighbours' must be 2-D")(
    lambda: am.pad_halo(packed(), layout().neighbours.reshape(-1), 1, 1)
)
case("pad_halo.negative_lo", ValueError, r"pad_halo: argument 'lo' must be an int")(
    lambda: am.pad_halo(packed(), layout().neighbours, -1, 1)
)


def _pack_round_trip_matches_reference() -> None:
    """Non-contiguous input, and an empty layout (no visible patch): the reference's
    results."""
    lay = MaskLayout.build(
        torch.rand(2, 1, 2, 2, 2, generator=torch.Generator().manual_seed(0)) < 0.5, stages=1
    )
    x = torch.randn(2, 8, 8, 2, 8).transpose(2, 4)  # (2, 2, 8, 8, 8), non-contiguous
    got = am.pack_patches(x, lay.patches, lay.slots)
    torch.testing.assert_close(got, pack_patches_reference(x, lay.patches, lay.slots))
    torch.testing.assert_close(
        am.unpack_patches(got, lay.patches, lay.slots),
        unpack_patches_reference(got, lay.patches, lay.slots),
    )
    halo = am.pad_halo(got.transpose(2, 3), lay.neighbours, 1, 0)
    torch.testing.assert_close(halo, pad_halo_reference(got.transpose(2, 3), lay.neighbours, 1, 0))
    empty = MaskLayout.build(torch.zeros(1, 1, 2, 2, 2, dtype=torch.bool), stages=1)
    assert am.pack_patches(volume(), empty.patches, empty.slots).shape == (0, 2, 4, 4, 4)
    zeros = am.unpack_patches(torch.randn(0, 2, 4, 4, 4), empty.patches, empty.slots)
    assert zeros.shape == (1, 2, 8, 8, 8) and not zeros.any()


case("packing.non_contiguous_and_empty_match_reference", None)(_pack_round_trip_matches_reference)

# ---- invalid values (issue 19: accepted before) ----

MASK = torch.ones(1, 1, 2, 2, 2, dtype=torch.bool)
for eps in (-1.0, 0.0, float("nan"), float("inf")):
    case(
        f"sparse_norm.eps={eps}",
        ValueError,
        r"sparse_norm: argument 'eps' must be positive and finite",
    )(lambda eps=eps: am.sparse_norm(volume(), MASK, None, None, eps=eps))
    case(
        f"patch_recon_loss.eps={eps}",
        ValueError,
        r"patch_recon_loss: argument 'eps' must be "
        r"positive and finite",
    )(lambda eps=eps: am.patch_recon_loss(volume(), volume(), MASK, 4, eps=eps))
case("sparse_norm.eps_str", TypeError, r"sparse_norm: argument 'eps' must be a real number")(
    lambda: am.sparse_norm(volume(), MASK, None, None, eps="1e-5")
)


def _seg_outputs() -> list[torch.Tensor]:
    return [torch.randn(1, 3, 8, 8, 8), torch.randn(1, 3, 4, 4, 4)]


_LABELS = torch.zeros(1, 8, 8, 8, dtype=torch.long)
for weights in ([float("nan"), 1.0], [1.0, float("inf")], [-1.0, 1.0]):
    case(
        f"deep_supervision_loss.weights={weights}",
        ValueError,
        r"deep_supervision_loss: argument 'weights' must hold finite numbers >= 0",
    )(lambda weights=weights: am.deep_supervision_loss(_seg_outputs(), _LABELS, weights=weights))
case(
    "deep_supervision_loss.weights_str",
    TypeError,
    r"deep_supervision_loss: argument 'weights' must hold real numbers",
)(lambda: am.deep_supervision_loss(_seg_outputs(), _LABELS, weights=["1", 1.0]))
case(
    "ids_to_active.duplicate_ids",
    ValueError,
    r"ids_to_active: argument 'ids_keep' must hold distinct indices per sample",
)(lambda: am.ids_to_active(torch.tensor([[3, 3]]), (1, 16)))
case(
    "ids_to_active.id=L",
    ValueError,
    r"ids_to_active: argument 'ids_keep' must hold indices in \[0, 16\).*maximum of 16",
)(lambda: am.ids_to_active(torch.tensor([[3, 16]]), (1, 16)))
case(
    "ids_to_active.id=-1",
    ValueError,
    r"ids_to_active: argument 'ids_keep' must hold indices in \[0, 16\).*minimum of -1",
)(lambda: am.ids_to_active(torch.tensor([[-1, 2]]), (1, 16)))
case(
    "gather_tokens.ids_out_of_range",
    ValueError,
    r"gather_tokens: argument 'ids_keep' must hold indices in \[0, 4\)",
)(lambda: am.gather_tokens(torch.randn(1, 4, 3), torch.tensor([[0, BIG]])))
case(
    "gather_tokens.duplicate_ids",
    ValueError,
    r"gather_tokens: argument 'ids_keep' must hold distinct indices",
)(lambda: am.gather_tokens(torch.randn(1, 4, 3), torch.tensor([[1, 1]])))
case(
    "scatter_tokens.not_a_permutation",
    ValueError,
    r"scatter_tokens: argument 'ids_restore' must be a permutation",
)(lambda: am.scatter_tokens(torch.randn(1, 2, 3), torch.tensor([[0, 1, 1, 3]]), torch.zeros(3)))
case(
    "anatomical_mask.nan_errors",
    ValueError,
    r"anatomical_mask: argument 'errors' must be "
    r"finite",
)(lambda: am.anatomical_mask(torch.tensor([[0.1, float("nan"), 0.3, 0.2]]), 0.5, 1.0))
case(
    "dice_ce_loss.label_out_of_range",
    ValueError,
    r"dice_ce_loss: argument 'labels' must hold class indices in \[0, 3\)",
)(
    lambda: am.dice_ce_loss(
        torch.randn(1, 3, 4, 4, 4), with_value(torch.zeros(1, 4, 4, 4, dtype=torch.long), 5, 7)
    )
)

# ---- raw operators: every tensor checked (issue 19: crashes and obscure messages) ----

raw(
    "pack_patches.issue_example",
    ValueError,
    r"pack_patches: argument 'patches' must hold indices in \[0, 8\) of the 8 cells of "
    r"the \[1, 2, 2, 2\] grid of 'slots'; got a maximum of 1099511627776",
)(lambda: ops.pack_patches(volume(), torch.tensor([0, BIG]), layout().slots))
raw(
    "unpack_patches.patches_disagree_with_slots",
    ValueError,
    r"arguments 'patches' and 'slots' disagree",
)(lambda: ops.unpack_patches(packed(), swapped_patches(), layout().slots))
raw("unpack_patches.extra_slot", ValueError, r"arguments 'patches' and 'slots' disagree")(
    lambda: ops.unpack_patches(packed()[:7], layout().patches[:7], with_value(layout().slots, 7, 0))
)
raw("pad_halo_backward.asymmetric_neighbours", ValueError, r"'neighbours' must be symmetric")(
    lambda: ops.pad_halo_backward(halo_grad(), asymmetric_neighbours(), 1, 1)
)
raw("pack_patches.patches_int32", TypeError, rf"pack_patches: argument 'patches' {LONG}")(
    lambda: ops.pack_patches(volume(), layout().patches.int(), layout().slots)
)
raw("pack_patches.x_int", TypeError, rf"pack_patches: argument 'x' {FLOAT}")(
    lambda: ops.pack_patches(volume().int(), layout().patches, layout().slots)
)
raw("unpack_patches.packed_4d", ValueError, r"unpack_patches: argument 'packed' must be 5-D")(
    lambda: ops.unpack_patches(packed()[0], layout().patches, layout().slots)
)
raw(
    "pad_halo.lo_negative",
    ValueError,
    r"pad_halo: (halo widths 'lo'=-1|argument 'lo' must be an int)",
)(lambda: ops.pad_halo(packed(), layout().neighbours, -1, 1))
raw(
    "pad_halo_backward.hi_negative",
    ValueError,
    r"pad_halo_backward: (halo widths|argument 'hi' must be an int)",
)(lambda: ops.pad_halo_backward(halo_grad(), layout().neighbours, 3, -1))
raw("pad_halo_backward.grad_int", TypeError, rf"pad_halo_backward: argument 'grad' {FLOAT}")(
    lambda: ops.pad_halo_backward(halo_grad().int(), layout().neighbours, 1, 1)
)

# sparse_norm(_backward): the statistics a backward receives are checked.
X64 = lambda: torch.randn(1, 64, 4, 4, 4)  # noqa: E731
A1 = torch.ones(1, 1, 1, 1, 1, dtype=torch.bool)
raw("sparse_norm.eps=-1", ValueError, r"sparse_norm: argument 'eps' must be positive")(
    lambda: ops.sparse_norm(volume(), MASK, None, None, False, -1.0, "none")
)
raw("sparse_norm.weight_on_meta", ValueError, r"sparse_norm: argument 'weight' is on meta")(
    lambda: ops.sparse_norm(volume(), MASK, torch.ones(2, device="meta"), None, False, 1e-5, "none")
)
raw("sparse_norm.weight_wrong_size", ValueError, r"sparse_norm: argument 'weight' must have 2")(
    lambda: ops.sparse_norm(volume(), MASK, torch.ones(3), None, False, 1e-5, "none")
)
raw("sparse_norm.x_double_weight_int", TypeError, rf"sparse_norm: argument 'weight' {FLOAT}")(
    lambda: ops.sparse_norm(
        volume().double(), MASK, torch.ones(2, dtype=torch.int32), None, False, 1e-5, "none"
    )
)
raw("sparse_norm.activation", ValueError, r"argument 'activation' must be one of")(
    lambda: ops.sparse_norm(volume(), MASK, None, None, False, 1e-5, "gelu")
)
raw(
    "sparse_norm_backward.empty_stats",
    ValueError,
    r"sparse_norm_backward: argument 'mean' must have shape \(1, C=4\) or \(B=1, C=4\)",
)(
    lambda: ops.sparse_norm_backward(
        torch.randn(1, 4, 4, 4, 4),
        torch.randn(1, 4, 4, 4, 4),
        A1,
        None,
        None,
        torch.empty(0, 4),
        torch.empty(0, 4),
        "none",
    )
)
raw(
    "sparse_norm_backward.stats_1x1_for_C64",
    ValueError,
    r"sparse_norm_backward: argument 'mean' must have shape \(1, C=64\)",
)(
    lambda: ops.sparse_norm_backward(
        X64(), X64(), A1, None, None, torch.zeros(1, 1), torch.ones(1, 1), "none"
    )
)
raw(
    "sparse_norm_backward.rstd_shape",
    ValueError,
    r"sparse_norm_backward: argument 'rstd' must have shape [\[(]1, 64[\])]",
)(
    lambda: ops.sparse_norm_backward(
        X64(), X64(), A1, None, None, torch.zeros(1, 64), torch.ones(1, 1), "none"
    )
)
raw(
    "sparse_norm_backward.stats_double",
    TypeError,
    r"sparse_norm_backward: argument 'mean' must (be Float|have dtype in \(torch.float32\)), "
    r"got (Double|torch.float64)",
)(
    lambda: ops.sparse_norm_backward(
        X64(),
        X64(),
        A1,
        None,
        None,
        torch.zeros(1, 64, dtype=torch.float64),
        torch.ones(1, 64),
        "none",
    )
)
raw(
    "sparse_norm_backward.grad_double",
    TypeError,
    r"sparse_norm_backward: argument 'grad' must have the dtype of 'x' \((Float|torch.float32)\)",
)(
    lambda: ops.sparse_norm_backward(
        X64().double(), X64(), A1, None, None, torch.zeros(1, 64), torch.ones(1, 64), "none"
    )
)
raw(
    "sparse_norm_backward.grad_shape",
    ValueError,
    r"sparse_norm_backward: argument 'grad' must have the shape of 'x'",
)(
    lambda: ops.sparse_norm_backward(
        torch.randn(1, 64, 4, 4, 2),
        X64(),
        A1,
        None,
        None,
        torch.zeros(1, 64),
        torch.ones(1, 64),
        "none",
    )
)

# patch_recon_loss(_backward)
P = lambda: torch.randn(1, 4, 32, 32, 32)  # noqa: E731
AP = torch.ones(1, 1, 2, 2, 2, dtype=torch.bool)
raw("patch_recon_loss.eps=-1", ValueError, r"patch_recon_loss: argument 'eps' must be positive")(
    lambda: ops.patch_recon_loss(P(), P(), AP, True, -1.0, False)
)
raw(
    "patch_recon_loss.rec_smaller",
    ValueError,
    r"patch_recon_loss: argument 'rec' must have the shape of 'x'",
)(lambda: ops.patch_recon_loss(torch.randn(1, 4, 2, 2, 2), P(), AP, True, 1e-6, False))
raw("patch_recon_loss.x_int", TypeError, rf"patch_recon_loss: argument 'x' {FLOAT}")(
    lambda: ops.patch_recon_loss(P().int(), P().int(), AP, True, 1e-6, False)
)
raw("patch_recon_loss.active_float", TypeError, r"argument 'active' must be a bool tensor")(
    lambda: ops.patch_recon_loss(P(), P(), AP.float(), True, 1e-6, False)
)
raw(
    "patch_recon_loss_backward.rec_smaller",
    ValueError,
    r"patch_recon_loss_backward: argument 'rec' must have the shape of 'x'",
)(
    lambda: ops.patch_recon_loss_backward(
        torch.ones(1, 8),
        torch.randn(1, 4, 2, 2, 2),
        P(),
        AP,
        torch.zeros(1, 8),
        torch.ones(1, 8),
        False,
    )
)
raw(
    "patch_recon_loss_backward.empty_stats",
    ValueError,
    r"patch_recon_loss_backward: argument 'mean' must have shape [\[(]1, 8[\])], "
    r"got [\[(]0,?[\])]",
)(
    lambda: ops.patch_recon_loss_backward(
        torch.ones(1, 8), P(), P(), AP, torch.empty(0), torch.empty(0), False
    )
)
raw(
    "patch_recon_loss_backward.stats_1x1",
    ValueError,
    r"patch_recon_loss_backward: argument 'grad_per_patch' must have shape [\[(]1, 8[\])]",
)(
    lambda: ops.patch_recon_loss_backward(
        torch.ones(1, 1), P(), P(), AP, torch.zeros(1, 1), torch.ones(1, 1), False
    )
)
raw(
    "patch_recon_loss_backward.rstd_double",
    TypeError,
    r"patch_recon_loss_backward: argument 'rstd' must (be Float|have dtype in \(torch.float32\)), "
    r"got (Double|torch.float64)",
)(
    lambda: ops.patch_recon_loss_backward(
        torch.ones(1, 8),
        P(),
        P(),
        AP,
        torch.zeros(1, 8),
        torch.ones(1, 8, dtype=torch.float64),
        False,
    )
)
raw(
    "patch_recon_loss_backward.rec_double",
    TypeError,
    r"argument 'rec' must have the dtype of 'x' \((Float|torch.float32)\), "
    r"got (Double|torch.float64)",
)(
    lambda: ops.patch_recon_loss_backward(
        torch.ones(1, 8), P().double(), P(), AP, torch.zeros(1, 8), torch.ones(1, 8), False
    )
)

# densify / apply_mask
raw("densify.token_int", TypeError, rf"densify: argument 'mask_token' {FLOAT}")(
    lambda: ops.densify(volume(), MASK, torch.zeros(2, dtype=torch.int32))
)
raw("densify.token_wrong_size", ValueError, r"densify: argument 'mask_token' must have 2 values")(
    lambda: ops.densify(volume(), MASK, torch.zeros(3))
)
raw("densify.token_on_meta", ValueError, r"densify: argument 'mask_token' is on meta")(
    lambda: ops.densify(volume(), MASK, torch.zeros(2, device="meta"))
)
raw("densify.x_int", TypeError, rf"densify: argument 'x' {FLOAT}")(
    lambda: ops.densify(volume().int(), MASK, torch.zeros(2))
)
raw("densify_backward.grad_int", TypeError, rf"densify_backward: argument 'grad' {FLOAT}")(
    lambda: ops.densify_backward(volume().int(), MASK)
)
raw("apply_mask.x_int", TypeError, rf"apply_mask: argument 'x' {FLOAT}")(
    lambda: ops.apply_mask(volume().int(), MASK)
)
raw(
    "apply_mask.active_grid_does_not_divide",
    ValueError,
    r"apply_mask: the (mask )?grid .* must divide the spatial shape",
)(lambda: ops.apply_mask(volume(), torch.ones(1, 1, 3, 2, 2, dtype=torch.bool)))

# token layout
raw("gather_tokens.x_2d", ValueError, r"gather_tokens: argument 'x' must be 3-D")(
    lambda: ops.gather_tokens(torch.randn(4, 3), torch.tensor([[0, 1]]))
)
raw(
    "gather_tokens.ids_out_of_range",
    ValueError,
    r"gather_tokens: argument 'ids_keep' must hold indices in \[0, 4\).*maximum of 1099511627776",
)(lambda: ops.gather_tokens(torch.randn(1, 4, 3), torch.tensor([[0, BIG]])))
raw("gather_tokens.ids_negative", ValueError, r"gather_tokens: .*minimum of -1")(
    lambda: ops.gather_tokens(torch.randn(1, 4, 3), torch.tensor([[0, -1]]))
)
raw("gather_tokens.ids_int32", TypeError, rf"gather_tokens: argument 'ids_keep' {LONG}")(
    lambda: ops.gather_tokens(torch.randn(1, 4, 3), torch.tensor([[0, 1]], dtype=torch.int32))
)
raw("gather_tokens.x_int", TypeError, rf"gather_tokens: argument 'x' {FLOAT}")(
    lambda: ops.gather_tokens(torch.zeros(1, 4, 3, dtype=torch.int32), torch.tensor([[0, 1]]))
)
raw(
    "gather_tokens_backward.negative_length",
    ValueError,
    r"gather_tokens_backward: argument 'length' must lie in \[2, ",
)(lambda: ops.gather_tokens_backward(torch.randn(1, 2, 3), torch.tensor([[0, 1]]), -1))
raw(
    "gather_tokens_backward.ids_width",
    ValueError,
    r"gather_tokens_backward: argument 'ids_keep' must have shape \(B=1, 2\)",
)(lambda: ops.gather_tokens_backward(torch.randn(1, 2, 3), torch.tensor([[0, 1, 2]]), 4))
raw(
    "gather_tokens_backward.duplicate_ids",
    ValueError,
    r"gather_tokens_backward: argument 'ids_keep' must hold distinct indices",
)(lambda: ops.gather_tokens_backward(torch.randn(1, 2, 3), torch.tensor([[1, 1]]), 4))
raw(
    "scatter_tokens_backward.negative_len_keep",
    ValueError,
    r"scatter_tokens_backward: argument 'len_keep' must lie in \[0, 4\], got -1",
)(
    lambda: ops.scatter_tokens_backward(
        torch.randn(1, 4, 3), torch.tensor([[0, 1, 2, 3]]), -1, False
    )
)
raw(
    "scatter_tokens_backward.len_keep_above_L",
    ValueError,
    r"scatter_tokens_backward: argument 'len_keep' must lie in \[0, 4\], got 9",
)(lambda: ops.scatter_tokens_backward(torch.randn(1, 4, 3), torch.tensor([[0, 1, 2, 3]]), 9, True))
raw(
    "scatter_tokens_backward.ids_width",
    ValueError,
    r"scatter_tokens_backward: argument 'ids_restore' must have shape \(B=1, 4\)",
)(lambda: ops.scatter_tokens_backward(torch.randn(1, 4, 3), torch.tensor([[0, 1]]), 1, False))
raw(
    "scatter_tokens.ids_out_of_range",
    ValueError,
    r"scatter_tokens: argument 'ids_restore' must hold indices in \[0, 4\)",
)(
    lambda: ops.scatter_tokens(
        torch.randn(1, 2, 3), torch.tensor([[0, 1, 2, BIG]]), torch.zeros(3), None
    )
)
raw(
    "scatter_tokens.not_a_permutation",
    ValueError,
    r"scatter_tokens: argument 'ids_restore' must be a permutation of \[0, 4\) per sample",
)(
    lambda: ops.scatter_tokens(
        torch.randn(1, 2, 3), torch.tensor([[0, 1, 1, 3]]), torch.zeros(3), None
    )
)
raw(
    "scatter_tokens_backward.not_a_permutation",
    ValueError,
    r"scatter_tokens_backward: argument 'ids_restore' must be a permutation",
)(lambda: ops.scatter_tokens_backward(torch.randn(1, 4, 3), torch.tensor([[0, 2, 2, 3]]), 2, False))
raw(
    "scatter_tokens.pos_embed_wrong_size",
    ValueError,
    r"scatter_tokens: argument 'pos_embed' must have 12 values",
)(
    lambda: ops.scatter_tokens(
        torch.randn(1, 2, 3), torch.tensor([[0, 1, 2, 3]]), torch.zeros(3), torch.zeros(3, 3)
    )
)
raw(
    "scatter_tokens.pos_embed_on_meta",
    ValueError,
    r"scatter_tokens: argument 'pos_embed' is on meta",
)(
    lambda: ops.scatter_tokens(
        torch.randn(1, 2, 3),
        torch.tensor([[0, 1, 2, 3]]),
        torch.zeros(3),
        torch.zeros(4, 3, device="meta"),
    )
)
raw("scatter_tokens.mask_token_int", TypeError, rf"scatter_tokens: argument 'mask_token' {FLOAT}")(
    lambda: ops.scatter_tokens(
        torch.randn(1, 2, 3), torch.tensor([[0, 1, 2, 3]]), torch.zeros(3, dtype=torch.int64), None
    )
)

# mask selection and segmentation loss
raw("anatomical_mask.negative_len_keep", ValueError, r"anatomical_mask: argument 'len_keep'")(
    lambda: ops.anatomical_mask(torch.rand(1, 8), None, -1, 0, 0, 0)
)
raw("anatomical_mask.noise_shape", ValueError, r"anatomical_mask: argument 'noise' must have")(
    lambda: ops.anatomical_mask(torch.rand(1, 8), torch.rand(1, 4), 2, 1, 0, 0)
)
raw("anatomical_mask.errors_int", TypeError, rf"anatomical_mask: argument 'errors' {FLOAT}")(
    lambda: ops.anatomical_mask(torch.zeros(1, 8, dtype=torch.int32), None, 2, 1, 0, 0)
)
raw(
    "dice_ce_loss.labels_float",
    TypeError,
    r"dice_ce_loss: argument 'labels' must (be int|have dtype in \(torch.int64)",
)(lambda: ops.dice_ce_loss(torch.randn(1, 3, 4, 4, 4), torch.zeros(1, 64), None))
raw(
    "dice_ce_loss_backward.grad_shape",
    ValueError,
    r"dice_ce_loss_backward: argument 'grad_class_sums' must have shape \(1, 3, 3\)",
)(
    lambda: ops.dice_ce_loss_backward(
        torch.ones(1, 3, 2),
        torch.ones(1),
        torch.randn(1, 3, 4, 4, 4),
        torch.zeros(1, 64, dtype=torch.long),
        None,
    )
)


def names() -> list[str]:
    """Every case under every backend it runs with: 'name@backend' (public API under
    ``use_backend``) or 'raw.name@cpp' / 'raw.name@triton' (the C++ or Triton operator)."""
    only = os.environ.get(BACKENDS_ENV)
    out = []
    for name, c in CASES.items():
        out.extend(
            f"{name}@{b}"
            for b in (PUBLIC_BACKENDS if c.public else RAW_BACKENDS)
            if only is None or b in only.split(",")
        )
    return out

"""Mask selection family: AnatoMask's loss-guided mask, the random mask, and the
conversions between a visible mask and MAE-style ids. Per sample, with ``n_mask = L -
len_keep`` hidden patches: the ``n_hard = floor(n_mask * hard_frac)`` patches of largest
teacher error are hidden, then ``n_mask - n_hard`` more drawn uniformly without
replacement from the rest (all ``n_mask`` at random when ``n_hard`` is 0).

One kernel launch selects the masks of the whole batch on the errors' device, with
no host synchronization: the random part comes from Philox in the kernel, keyed by
``(seed, offset)``. The seed defaults to a draw from torch's CPU generator (which
does not touch the device), so ``torch.manual_seed`` makes runs reproducible.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .. import _extension
from ..dispatch import Op
from ..reference.mask_select import anatomical_mask_reference, ids_from_active
from ..validation import (
    FLOAT_DTYPES,
    check_index_values,
    check_same_device,
    check_tensor,
    data_known,
    register_fake,
    require,
)

ANATOMICAL_MASK = Op(
    "anatomical_mask",
    reference=anatomical_mask_reference,
    cpp="anatomical_mask",
    triton="mask_select:anatomical_mask_triton",
)

SEED_LIMIT = 2**63


@dataclass(frozen=True)
class MaskResult:
    """A batch of masks. ``active`` and ``hard`` have the shape of the errors given
    ((B, L) or (B, 1, h, w, d)); the ids are (B, ...) int64 over the flattened grid.

    - ``active``: True = visible (kept), exactly ``len_keep`` per sample;
    - ``hard``: True for hidden patches chosen by their error (``n_hard`` per sample);
    - ``ids_shuffle``: kept patches, then hidden ones, each in ascending index order;
    - ``ids_restore = argsort(ids_shuffle)``.
    """

    active: torch.Tensor
    hard: torch.Tensor
    ids_shuffle: torch.Tensor
    ids_restore: torch.Tensor
    len_keep: int
    n_hard: int

    @property
    def hidden(self) -> torch.Tensor:
        return ~self.active

    @property
    def ids_keep(self) -> torch.Tensor:
        """(B, len_keep): the visible patches, ascending."""
        return self.ids_shuffle[:, : self.len_keep]

    @property
    def ids_hidden(self) -> torch.Tensor:
        """(B, L - len_keep): the hidden patches, ascending."""
        return self.ids_shuffle[:, self.len_keep :]


def _check_mask_shape(op: str, name: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """(B, L) of a (B, L) or (B, 1, h, w, d) shape."""
    if not (len(shape) == 2 or (len(shape) == 5 and shape[1] == 1)):
        raise ValueError(
            f"{op}: argument '{name}' must have shape (B, L) or (B, 1, h, w, d), got {tuple(shape)}"
        )
    if shape[0] < 1 or math.prod(shape[1:]) < 2:
        raise ValueError(
            f"{op}: argument '{name}' needs B >= 1 and L >= 2 patches, got shape {tuple(shape)}"
        )
    return shape[0], math.prod(shape[1:])


def _check_fraction(op: str, name: str, value: object, *, open_low: bool, open_high: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{op}: argument '{name}' must be a real number, got {type(value).__name__}"
        )
    value = float(value)
    low_ok = value > 0 if open_low else value >= 0
    high_ok = value < 1 if open_high else value <= 1
    if not (low_ok and high_ok):
        interval = ("(" if open_low else "[") + "0, 1" + (")" if open_high else "]")
        raise ValueError(f"{op}: argument '{name}' must be in {interval}, got {value}")
    return value


def mask_counts(
    L: int, mask_ratio: float, hard_frac: float = 0.0, *, op: str = "anatomical_mask"
) -> tuple[int, int]:
    """``(len_keep, n_hard)`` as the reference computes them:
    ``len_keep = round(L * (1 - mask_ratio))``, ``n_hard = floor((L - len_keep) * hard_frac)``."""
    mask_ratio = _check_fraction(op, "mask_ratio", mask_ratio, open_low=True, open_high=True)
    hard_frac = _check_fraction(op, "hard_frac", hard_frac, open_low=False, open_high=False)
    len_keep = round(L * (1 - mask_ratio))
    if not 1 <= len_keep < L:
        raise ValueError(
            f"{op}: mask_ratio={mask_ratio} keeps {len_keep} of L={L} patches; "
            "at least one must be kept and one hidden"
        )
    return len_keep, math.floor((L - len_keep) * hard_frac)


def _check_int(op: str, name: str, value: object, limit: int = SEED_LIMIT) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: argument '{name}' must be an int, got {type(value).__name__}")
    if not 0 <= value < limit:
        raise ValueError(f"{op}: argument '{name}' must be in [0, 2**63), got {value}")
    return int(value)


def _draw_seed(op: str, seed: int | None, generator: torch.Generator | None) -> int:
    if seed is not None:
        return _check_int(op, "seed", seed)
    # A CPU draw: reproducible under torch.manual_seed, no device synchronization.
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())


def _check_finite(op: str, name: str, value: torch.Tensor) -> None:
    finite = torch.isfinite(value).all()
    if value.device.type == "cpu" and data_known(value):
        if not finite:
            raise ValueError(f"{op}: argument '{name}' must be finite (no NaN or Inf)")
    else:
        # On a GPU a host-side check would synchronize: assert on the device instead.
        torch._assert_async(finite, f"{op}: argument '{name}' must be finite (no NaN or Inf)")


def _check_noise(
    op: str, noise: object, batch: int, length: int, like: torch.Tensor
) -> torch.Tensor:
    check_tensor(op, "noise", noise, dtypes=FLOAT_DTYPES)
    if noise.dim() < 1 or noise.shape[0] != batch or noise.numel() != batch * length:
        raise ValueError(
            f"{op}: argument 'noise' must have shape ({batch}, {length}) or the "
            f"errors' grid shape, got {tuple(noise.shape)}"
        )
    check_same_device(op, errors=like, noise=noise)
    _check_finite(op, "noise", noise)
    return noise.reshape(batch, length).float()


def _select(
    op: str,
    errors: torch.Tensor,
    shape: tuple[int, ...],
    len_keep: int,
    n_hard: int,
    noise: object,
    seed: int | None,
    offset: int,
    generator: torch.Generator | None,
) -> MaskResult:
    batch, length = errors.shape
    if noise is not None:
        noise = _check_noise(op, noise, batch, length, errors)
    backend = ANATOMICAL_MASK.select(errors.device)
    if n_hard > 0 and backend not in ("cpu", "cuda"):  # the C++ kernels check as they read
        _check_finite(op, "errors", errors)
    # Given noise, the seed is unused: no draw (and nothing data-dependent to trace).
    seed = _draw_seed(op, seed, generator) if noise is None else 0
    active, hard, ids_shuffle, ids_restore = ANATOMICAL_MASK.kernel(backend)(
        errors, noise, len_keep, n_hard, seed, _check_int(op, "offset", offset)
    )
    return MaskResult(
        active.view(shape), hard.view(shape), ids_shuffle, ids_restore, len_keep, n_hard
    )


def anatomical_mask(
    errors: torch.Tensor,
    mask_ratio: float,
    hard_frac: float,
    *,
    noise: torch.Tensor | None = None,
    seed: int | None = None,
    offset: int = 0,
    generator: torch.Generator | None = None,
) -> MaskResult:
    """AnatoMask's mask from the teacher's per-patch errors (B, L) or (B, 1, h, w, d).

    Per sample: ``len_keep = round(L * (1 - mask_ratio))`` patches stay visible;
    ``n_hard = floor((L - len_keep) * hard_frac)`` patches with the largest errors are
    hidden (errors ranked as float32, ties by lower index), plus ``L - len_keep -
    n_hard`` drawn uniformly without replacement from the others; purely random when
    ``n_hard`` is 0.

    Randomness: Philox keyed by ``seed`` (default: drawn from ``generator``, torch's
    default CPU generator when None) at counter ``offset``; or an explicit ``noise``
    (B, L) (the remaining patches with the smallest noise are hidden, ties by index),
    which makes every backend give identical masks. Under ``torch.compile``, pass
    ``seed`` or ``noise``: the default seed is a host-side draw. Not differentiable.

    Errors must be finite: a ValueError on CPU tensors; on a GPU a device-side
    assertion (``torch._assert_async``), since a host-side check would synchronize.
    """
    op = "anatomical_mask"
    check_tensor(op, "errors", errors, dtypes=FLOAT_DTYPES)
    batch, length = _check_mask_shape(op, "errors", tuple(errors.shape))
    len_keep, n_hard = mask_counts(length, mask_ratio, hard_frac, op=op)
    flat = errors.detach().reshape(batch, length)
    if flat.dtype == torch.float64:
        flat = flat.float()
    return _select(op, flat, tuple(errors.shape), len_keep, n_hard, noise, seed, offset, generator)


def random_mask(
    shape: tuple[int, ...] | torch.Size,
    mask_ratio: float,
    *,
    device: torch.device | str | None = None,
    noise: torch.Tensor | None = None,
    seed: int | None = None,
    offset: int = 0,
    generator: torch.Generator | None = None,
) -> MaskResult:
    """A uniform random mask of ``shape`` (B, L) or (B, 1, h, w, d): exactly
    ``round(L * (1 - mask_ratio))`` visible patches per sample (the teacher's mask).
    Randomness as in :func:`anatomical_mask`."""
    op = "random_mask"
    shape = tuple(shape)
    batch, length = _check_mask_shape(op, "shape", shape)
    len_keep, _ = mask_counts(length, mask_ratio, op=op)
    if device is None:
        device = noise.device if isinstance(noise, torch.Tensor) else torch.device("cpu")
    # Never read without hard patches: a stride-0 placeholder for the batch shape.
    errors = torch.zeros((), device=device).expand(batch, length)
    return _select(op, errors, shape, len_keep, 0, noise, seed, offset, generator)


def active_to_ids(active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids_shuffle, ids_restore)`` of a visible mask (B, L) or (B, 1, h, w, d):
    kept patches first, then hidden ones, each ascending; ``ids_keep`` is
    ``ids_shuffle[:, :len_keep]`` when every sample keeps ``len_keep`` patches."""
    op = "active_to_ids"
    check_tensor(op, "active", active, dtypes=(torch.bool,))
    batch, length = _check_mask_shape(op, "active", tuple(active.shape))
    return ids_from_active(active.reshape(batch, length))


def ids_to_active(ids_keep: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """The bool visible mask of ``shape`` (B, L) or (B, 1, h, w, d) whose visible
    patches are ``ids_keep`` (B, len_keep) (any order)."""
    op = "ids_to_active"
    check_tensor(op, "ids_keep", ids_keep, ndim=2, dtypes=(torch.int64,))
    batch, length = _check_mask_shape(op, "shape", tuple(shape))
    if ids_keep.shape[0] != batch or ids_keep.shape[1] > length:
        raise ValueError(
            f"{op}: argument 'ids_keep' must be ({batch}, len_keep <= {length}), "
            f"got {tuple(ids_keep.shape)}"
        )
    check_index_values(
        op, "ids_keep", ids_keep, 0, length, f"the L={length} patches of each sample"
    )
    active = torch.zeros(batch, length, dtype=torch.bool, device=ids_keep.device)
    active.scatter_(1, ids_keep.clamp(0, length - 1), True)
    # Distinct ids: exactly len_keep visible patches per sample.
    require(
        (active.sum(1) == ids_keep.shape[1]).all(),
        f"{op}: argument 'ids_keep' must hold distinct indices per sample",
    )
    return active.view(tuple(shape))


def _register_cpp() -> None:
    """Fake kernel of the C++ operator (its schema is in csrc/ops.cpp); no autograd: the
    outputs are flags and indices."""

    @register_fake("anatomask_fast::anatomical_mask")
    def _(errors, noise, len_keep, n_hard, seed, offset):
        flags = errors.new_empty(errors.shape, dtype=torch.bool)
        ids = errors.new_empty(errors.shape, dtype=torch.int64)
        return flags, flags.clone(), ids, ids.clone()


if _extension.load()[0] is not None:
    _register_cpp()

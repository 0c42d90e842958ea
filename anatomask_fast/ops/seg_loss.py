"""Segmentation loss family: nnU-Net's Dice + cross-entropy, fused.

The compiled ``dice_ce_loss`` operator reads the logits and the integer label map
once and returns the loss's sufficient statistics (fp32; fp64 for fp64 logits):
``class_sums`` (B, 3, K) = per sample and class (intersection, sum of probabilities,
ground-truth count) and ``ce_sums`` (B,) = per-sample sum of -log softmax[label],
computed over the counted voxels (not ``ignore_label``). No softmax or one-hot
tensor exists. The scalar loss is a few torch ops on those tiny tensors, so autograd
hands the operator's backward a (B, 3, K) and a (B,) gradient, from which it writes
the logits' gradient in one pass, recomputing the softmax.

Labels outside [0, K) (other than ``ignore_label``) raise a ValueError for CPU tensors
(checked before the kernels, outside torch.compile). On CUDA tensors they are not
checked on the host (that would synchronize): the kernels drop such voxels from both
terms and set their sample's CE sum to NaN, so the loss comes out NaN (the reference
backend fails there as PyTorch's scatter and cross_entropy do).
"""

from __future__ import annotations

import math
import numbers

import torch

from .. import _extension, autograd
from ..contracts import LABEL_DTYPES
from ..dispatch import Op
from ..numerics import accumulation_dtype
from ..reference.seg_loss import dice_ce_loss_reference, soft_dice_from_sums
from ..validation import check_same_device, check_tensor, check_volume, data_known, register_fake

DICE_CE_LOSS = Op(
    "dice_ce_loss",
    reference=dice_ce_loss_reference,
    cpp="dice_ce_loss",
    triton="seg_loss:dice_ce_loss_triton",
)


def _check_labels(
    op: str, logits: torch.Tensor, labels: object, ignore_label: int | None
) -> torch.Tensor:
    """The (B, S) view of a (B, H, W, D) or (B, 1, H, W, D) integer label map."""
    check_tensor(op, "labels", labels, dtypes=LABEL_DTYPES)
    batch, spatial = logits.shape[0], tuple(logits.shape[2:])
    if tuple(labels.shape) not in ((batch, *spatial), (batch, 1, *spatial)):
        raise ValueError(
            f"{op}: argument 'labels' must have shape {(batch, *spatial)} or "
            f"{(batch, 1, *spatial)} to match 'logits' {tuple(logits.shape)}, "
            f"got {tuple(labels.shape)}"
        )
    check_same_device(op, logits=logits, labels=labels)
    if labels.device.type == "cpu" and data_known(labels) and labels.numel():
        _check_label_values(op, labels, logits.shape[1], ignore_label)
    return labels.reshape(batch, -1)


def _check_label_values(
    op: str, labels: torch.Tensor, classes: int, ignore_label: int | None
) -> None:
    low, high = torch.aminmax(labels)
    if low >= 0 and high < classes:
        return
    kept = labels if ignore_label is None else labels[labels != ignore_label]
    bad = kept[(kept < 0) | (kept >= classes)]
    if bad.numel():
        allowed = "" if ignore_label is None else f" or the ignore_label {ignore_label}"
        raise ValueError(
            f"{op}: argument 'labels' must hold class indices in [0, {classes})"
            f"{allowed} for the {classes} classes of 'logits', got "
            f"{bad.unique()[:8].tolist()}"
        )


def _check_options(
    op: str, smooth: float, weight_ce: float, weight_dice: float, ignore_label: int | None
) -> None:
    for name, value in (("smooth", smooth), ("weight_ce", weight_ce), ("weight_dice", weight_dice)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{op}: argument '{name}' must be a float, got {type(value).__name__}")
    if ignore_label is not None and (
        isinstance(ignore_label, bool) or not isinstance(ignore_label, int)
    ):
        raise TypeError(
            f"{op}: argument 'ignore_label' must be an int or None, got "
            f"{type(ignore_label).__name__}"
        )


def dice_ce_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_dice: bool = False,
    do_bg: bool = False,
    smooth: float = 1e-5,
    weight_ce: float = 1.0,
    weight_dice: float = 1.0,
    ignore_label: int | None = None,
) -> torch.Tensor:
    """nnU-Net's DC_and_CE_loss: ``weight_ce * CE + weight_dice * (-mean soft Dice)``.

    ``logits`` (B, K, H, W, D) float (fp32/fp16/bf16/fp64; fp32 accumulation, fp64 for
    fp64), ``labels`` (B, H, W, D) or (B, 1, H, W, D) integer class map. CE is the mean
    of -log softmax[label] over the voxels; the Dice is MemoryEfficientSoftDiceLoss:
    per class sums over space (``batch_dice``: and over the batch),
    ``dc = (2 I + smooth) / clip(P + G + smooth, 1e-8)``, background excluded unless
    ``do_bg``. Voxels labelled ``ignore_label`` count in neither term. Returns an fp32
    scalar, differentiable in ``logits``.
    """
    op = "dice_ce_loss"
    check_volume(op, "logits", logits)
    _check_options(op, smooth, weight_ce, weight_dice, ignore_label)
    flat_labels = _check_labels(op, logits, labels, ignore_label)
    backend = DICE_CE_LOSS.select(logits.device)
    if backend == "reference":
        return dice_ce_loss_reference(
            logits,
            labels,
            batch_dice=batch_dice,
            do_bg=do_bg,
            smooth=smooth,
            weight_ce=weight_ce,
            weight_dice=weight_dice,
            ignore_label=ignore_label,
        )
    class_sums, ce_sums = DICE_CE_LOSS.kernel(backend)(logits, flat_labels, ignore_label)
    intersect, sum_pred, sum_gt = class_sums.unbind(1)
    dice = soft_dice_from_sums(
        intersect, sum_pred, sum_gt.detach(), batch_dice=batch_dice, do_bg=do_bg, smooth=smooth
    )
    # Every counted voxel has exactly one class: the ground-truth counts sum to the
    # number of voxels the CE averages over (0 only when all are ignored: CE = 0).
    ce = ce_sums.sum() / sum_gt.detach().sum().clamp(min=1)
    return weight_ce * ce + weight_dice * dice


def downsample_labels(labels: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """Nearest ("nearest-exact", as nnU-Net's DownsampleSegForDSTransform) resampling of
    an integer label map (B, [1,] H, W, D) to ``spatial``, by indexing (no float copy)."""
    size = tuple(labels.shape[-3:])
    if size == tuple(spatial):
        return labels
    index = [
        ((torch.arange(out, device=labels.device) + 0.5) * (inp / out))
        .floor()
        .long()
        .clamp(max=inp - 1)
        for inp, out in zip(size, spatial)
    ]
    return labels[..., index[0][:, None, None], index[1][None, :, None], index[2][None, None, :]]


def deep_supervision_weights(levels: int) -> list[float]:
    """nnU-Net's deep-supervision weights: halving per level, the lowest resolution
    dropped (weight 0), normalized to sum 1."""
    weights = [1 / 2**i for i in range(levels)]
    if levels > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


def deep_supervision_loss(
    outputs: list[torch.Tensor] | tuple[torch.Tensor, ...],
    labels: torch.Tensor,
    *,
    weights: list[float] | None = None,
    **options,
) -> torch.Tensor:
    """Weighted sum of :func:`dice_ce_loss` over deep-supervision ``outputs`` (logits
    at decreasing resolutions, the full resolution first), each against ``labels``
    resampled by nearest to its size. ``weights`` default to
    :func:`deep_supervision_weights`; levels with weight 0 are not computed.
    ``options`` go to :func:`dice_ce_loss`."""
    op = "deep_supervision_loss"
    if not isinstance(outputs, (list, tuple)) or not outputs:
        raise TypeError(
            f"{op}: argument 'outputs' must be a non-empty list of logits, got "
            f"{type(outputs).__name__}"
        )
    weights = deep_supervision_weights(len(outputs)) if weights is None else list(weights)
    if len(weights) != len(outputs):
        raise ValueError(
            f"{op}: argument 'weights' must have one entry per output "
            f"({len(outputs)}), got {len(weights)}"
        )
    for weight in weights:
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise TypeError(
                f"{op}: argument 'weights' must hold real numbers, got "
                f"{type(weight).__name__} in {weights}"
            )
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(
                f"{op}: argument 'weights' must hold finite numbers >= 0, got {weights}"
            )
    check_tensor(op, "labels", labels, dtypes=LABEL_DTYPES)
    total = None
    for weight, logits in zip(weights, outputs):
        if weight == 0:
            continue
        check_volume(op, "outputs", logits)
        term = weight * dice_ce_loss(logits, downsample_labels(labels, logits.shape[2:]), **options)
        total = term if total is None else total + term
    if total is None:
        raise ValueError(f"{op}: argument 'weights' must have a nonzero entry, got {weights}")
    return total


def _register_cpp() -> None:
    """Fake kernels and autograd for the C++ operators (schemas in csrc/ops.cpp)."""
    op = "anatomask_fast::dice_ce_loss"

    @register_fake(op)
    def _(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int | None):
        batch, classes = logits.shape[:2]
        dtype = accumulation_dtype(logits.dtype)
        return (
            logits.new_empty((batch, 3, classes), dtype=dtype),
            logits.new_empty((batch,), dtype=dtype),
        )

    @register_fake("anatomask_fast::dice_ce_loss_backward")
    def _(grad_class_sums, grad_ce_sums, logits, labels, ignore_index):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    autograd.register_cpp(autograd.seg_loss)


if _extension.load()[0] is not None:
    _register_cpp()

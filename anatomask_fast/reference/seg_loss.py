"""Reference segmentation loss: nnU-Net's DC_and_CE_loss (MemoryEfficientSoftDiceLoss
+ RobustCrossEntropyLoss) computed the plain way, with a softmax tensor, a one-hot
tensor built by scatter, products and sums, and F.cross_entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_from_sums(
    intersect: torch.Tensor,
    sum_pred: torch.Tensor,
    sum_gt: torch.Tensor,
    *,
    batch_dice: bool,
    do_bg: bool,
    smooth: float,
) -> torch.Tensor:
    """-mean(dc) from the (B, K) per-sample, per-class sums, as nnU-Net's
    MemoryEfficientSoftDiceLoss combines them."""
    if not do_bg:
        intersect, sum_pred, sum_gt = intersect[:, 1:], sum_pred[:, 1:], sum_gt[:, 1:]
    if batch_dice:
        intersect, sum_pred, sum_gt = intersect.sum(0), sum_pred.sum(0), sum_gt.sum(0)
    dc = (2 * intersect + smooth) / torch.clip(sum_gt + sum_pred + smooth, 1e-8)
    return -dc.mean()


def dice_ce_loss_reference(
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
    """``weight_ce * CE + weight_dice * soft Dice loss`` of ``logits`` (B, K, H, W, D)
    against the integer ``labels`` (B, H, W, D) or (B, 1, H, W, D).

    Voxels labelled ``ignore_label`` count in neither term; the CE is their mean over
    the others, and 0 when every voxel is ignored (nnU-Net skips it then).
    """
    target = labels.reshape(labels.shape[0], 1, *logits.shape[2:]).long()
    axes = tuple(range(2, logits.ndim))
    # fp32 math for fp16/bf16 (as under autocast), fp64 kept.
    work = logits.to(torch.promote_types(logits.dtype, torch.float32))
    probs = torch.softmax(work, 1)
    mask = None if ignore_label is None else target != ignore_label
    target_dice = target if mask is None else torch.where(mask, target, 0)
    with torch.no_grad():
        onehot = torch.zeros(logits.shape, device=logits.device, dtype=torch.bool)
        onehot.scatter_(1, target_dice, 1)
        sum_gt = (onehot if mask is None else onehot * mask).sum(axes)
    weighted = probs if mask is None else probs * mask
    intersect = (weighted * onehot).sum(axes)
    sum_pred = weighted.sum(axes)
    dice = soft_dice_from_sums(
        intersect, sum_pred, sum_gt, batch_dice=batch_dice, do_bg=do_bg, smooth=smooth
    )
    if mask is not None and not bool(mask.any()):
        ce = work.new_zeros(())
    else:
        ce = F.cross_entropy(
            work, target[:, 0], ignore_index=-100 if ignore_label is None else ignore_label
        )
    return weight_ce * ce + weight_dice * dice

"""Plain-PyTorch implementations that follow ../shared/SPEC.md (and the published
code's way of computing) literally. Every backend is tested against these, and the
benchmarks use them as the baseline."""
from .gather_scatter import (apply_mask_reference, densify_reference, sparse_norm_reference,
                             upsample_mask)
from .seg_loss import dice_ce_loss_reference

__all__ = ["apply_mask_reference", "densify_reference", "dice_ce_loss_reference",
           "sparse_norm_reference", "upsample_mask"]

"""Plain-PyTorch implementations that follow the method's formulas (each stated in its
docstring) and the published code's way of computing them literally. Every backend is tested against these, and the
benchmarks use them as the baseline."""

from .gather_scatter import (
    apply_mask_reference,
    densify_reference,
    gather_tokens_reference,
    scatter_tokens_reference,
    sparse_norm_reference,
    upsample_mask,
)
from .mask_select import anatomical_mask_reference
from .packing import (
    pack_patches_reference,
    pad_halo_backward_reference,
    pad_halo_reference,
    unpack_patches_reference,
)
from .patch_loss import patch_recon_loss_reference
from .seg_loss import dice_ce_loss_reference

__all__ = [
    "anatomical_mask_reference",
    "apply_mask_reference",
    "densify_reference",
    "dice_ce_loss_reference",
    "gather_tokens_reference",
    "pack_patches_reference",
    "pad_halo_backward_reference",
    "pad_halo_reference",
    "patch_recon_loss_reference",
    "scatter_tokens_reference",
    "sparse_norm_reference",
    "unpack_patches_reference",
    "upsample_mask",
]

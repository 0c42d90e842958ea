"""anatomask_fast: fused kernels for AnatoMask masked image modeling on 3D volumes.

Public ops dispatch to CUDA C++, Triton, C++ CPU or the plain-PyTorch reference
(see :mod:`anatomask_fast.dispatch`); ``backends()`` says which can run here.
"""

from ._version import __version__
from .dispatch import backends, use_backend
from .ops.gather_scatter import apply_mask, densify, gather_tokens, scatter_tokens, sparse_norm
from .ops.mask_select import MaskResult, active_to_ids, anatomical_mask, ids_to_active, random_mask
from .ops.packing import pack_patches, pad_halo, pad_halo_backward, unpack_patches
from .ops.patch_loss import patch_recon_loss
from .ops.seg_loss import deep_supervision_loss, dice_ce_loss
from .schedules import MaskingSchedule, masking_schedule

__all__ = [
    "MaskResult",
    "MaskingSchedule",
    "__version__",
    "active_to_ids",
    "anatomical_mask",
    "apply_mask",
    "backends",
    "deep_supervision_loss",
    "densify",
    "dice_ce_loss",
    "gather_tokens",
    "ids_to_active",
    "masking_schedule",
    "pack_patches",
    "pad_halo",
    "pad_halo_backward",
    "patch_recon_loss",
    "random_mask",
    "scatter_tokens",
    "sparse_norm",
    "unpack_patches",
    "use_backend",
]

"""anatomask_fast: fused kernels for AnatoMask masked image modeling on 3D volumes.

Public ops dispatch to CUDA C++, Triton, C++ CPU or the plain-PyTorch reference
(see :mod:`anatomask_fast.dispatch`); ``backends()`` says which can run here.
"""
from ._version import __version__
from .dispatch import backends, use_backend
from .ops.gather_scatter import apply_mask
from .ops.seg_loss import deep_supervision_loss, dice_ce_loss

__all__ = ["__version__", "apply_mask", "backends", "deep_supervision_loss", "dice_ce_loss",
           "use_backend"]

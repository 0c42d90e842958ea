"""Plain-PyTorch implementations that follow ../shared/SPEC.md (and the published
code's way of computing) literally. Every backend is tested against these, and the
benchmarks use them as the baseline."""
from .gather_scatter import (apply_mask_reference, densify_reference, gather_tokens_reference,
                             scatter_tokens_reference, sparse_norm_reference, upsample_mask)

__all__ = ["apply_mask_reference", "densify_reference", "gather_tokens_reference",
           "scatter_tokens_reference", "sparse_norm_reference", "upsample_mask"]

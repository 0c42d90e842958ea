"""The masked-pretraining execution of nnU-Net's residual encoder (the packed twin of
:class:`~anatomask_fast.models.resenc.ResidualEncoder`), on the engine and packed
kernels of :mod:`~anatomask_fast.models.sparse_encoder` (stage loop, masking,
packing), with the same two executions giving the same numbers:

- dense-masked (SparK / nnssl's SparK3D): the input masked, every conv and pooling
  run on the whole map and its output masked, every InstanceNorm a sparse norm with
  statistics over visible voxels only;
- packed: the stem, each ``BasicBlockD`` (conv1 with the stage's stride, conv2, and
  the ResNet-D skip: AvgPool by the stride, a 1x1x1 conv, a norm) on the visible
  patches with halos; the AvgPool windows lie inside a patch (the patch side is a
  multiple of the stride), so pooling the packed patches is exact.

Masks are 16^3 cells (published AnatoMask and nnssl), or the network's total stride
along an axis where that is smaller. A stage coarser than the cells (a six-stage
ResEnc's last, at 1/32) runs dense with every voxel visible, as nnssl's SparK3D runs it.
Stages run packed while cheaper (as for STU-Net) and where their convs are 3x3x3 with
one stride on every axis; the others (an anisotropic plan's) run dense-masked.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .packed_conv import halo_conv, norm_act_halo_conv
from .packed_norm import packed_norm
from .resenc import BasicBlockD, ConvNormAct, ResidualEncoder
from .sparse_encoder import SparseEncoder, masked
from .stunet import Triple

MASK_CELL = 16  # the published AnatoMask's and nnssl's mask cell side


class SparseResidualEncoder(SparseEncoder):
    """Masked-pretraining execution of a :class:`ResidualEncoder`'s modules (shared:
    the state_dict is the dense encoder's, ``stem.*`` and ``stages.*``).

    ``forward(x, active)``: ``x`` (B, C, H, W, D) divisible by the total stride, the
    visible mask (B, 1, H/p, W/p, D/p) for the cell ``patch`` p; returns every stage's
    output, shallowest first, hidden positions exactly zero in the masked stages.
    ``per_sample`` and ``packed_stages`` as for :class:`SparseSTUNetEncoder`."""

    name = "SparseResidualEncoder"

    def __init__(
        self,
        encoder: ResidualEncoder,
        *,
        per_sample: bool = False,
        packed_stages: int | None = None,
        cell: int = MASK_CELL,
    ) -> None:
        if not isinstance(encoder, ResidualEncoder):
            raise ValueError(
                f"SparseResidualEncoder: argument 'encoder' must be a "
                f"ResidualEncoder, got {type(encoder).__name__}"
            )
        arch = encoder.arch
        total = arch.total_stride
        patch = tuple(min(cell, t) for t in total)
        super().__init__(
            per_sample=per_sample, packed_stages=packed_stages, patch=patch, divisor=total
        )
        self.stem, self.stages = encoder.stem, encoder.stages
        self.arch, self.slope = arch, arch.slope
        self.widths, self.strides = arch.features, arch.strides[1:]
        sides: list[Triple | int | None] = []
        for s in range(arch.stages):
            cumulative = arch.cumulative_stride(s)
            side = (
                None
                if any(p % c for p, c in zip(patch, cumulative))
                else tuple(p // c for p, c in zip(patch, cumulative))
            )
            sides.append(side[0] if side and len(set(side)) == 1 else side)
        self.sides = tuple(sides)
        self.masked_stages = tuple(side is not None for side in sides)
        # Packed: 3x3x3 convs (the stem's too) and one stride (1 or 2) on every axis.
        self.packable = tuple(
            arch.kernels[s] == (3, 3, 3)
            and len(set(arch.strides[s])) == 1
            and arch.strides[s][0] in (1, 2)
            for s in range(arch.stages)
        )

    def _stage_blocks(self, s: int) -> list[nn.Module]:
        return list(self.stages[s].blocks)

    def _layout_options(self) -> dict:
        return {"sides": self.sides, "packable": self.packable}

    def _stem(self, h, layout, packed, group, groups):
        stem: ConvNormAct = self.stem.convs[0]
        if packed:
            return packed_norm(
                halo_conv(h, layout.neighbours, stem.conv, 1, 1),
                stem.norm.weight,
                stem.norm.bias,
                group,
                groups,
                eps=stem.norm.eps,
                slope=self.slope,
            )
        return self.norm(
            masked(stem.conv(h), layout.active), layout.active, stem.norm, "leaky_relu"
        )

    def _packed_block(self, s, i, block: BasicBlockD, h, layout, group, groups):
        """One BasicBlockD on packed patches, storing for backward the block's input
        (kept anyway), conv1's and conv2's outputs (the norms' inputs), the skip's
        pooled input and 1x1x1 output, and the block's output."""
        neighbours = layout.neighbours
        stride = block.stride[0]
        # A stride-2 3x3x3 conv (padding 1) reads voxels 2o-1..2o+1: a low-side halo.
        c1 = halo_conv(h, neighbours, block.conv1.conv, 1, 1 if stride == 1 else 0)
        y = norm_act_halo_conv(
            c1, block.conv1.norm, group, groups, self.slope, neighbours, block.conv2.conv
        )
        del c1
        norm2 = block.conv2.norm
        y = packed_norm(y, norm2.weight, norm2.bias, group, groups, eps=norm2.eps)
        skip = h
        for op in block.skip or ():
            if isinstance(op, nn.AvgPool3d):
                skip = F.avg_pool3d(skip, op.kernel_size, op.stride)
            else:
                skip = packed_norm(
                    halo_conv(skip, neighbours, op.conv, 0, 0),
                    op.norm.weight,
                    op.norm.bias,
                    group,
                    groups,
                    eps=op.norm.eps,
                )
        # In place: the block's output is the one tensor LeakyReLU's backward keeps.
        return F.leaky_relu_(y.add_(skip), self.slope)

    def _dense_block(self, block: BasicBlockD, h, visible):
        """One BasicBlockD SparK-style: dense convs and pooling, outputs masked, sparse
        norms (over every voxel in an unmasked stage)."""
        y = self.norm(masked(block.conv1.conv(h), visible), visible, block.conv1.norm, "leaky_relu")
        y = self.norm(masked(block.conv2.conv(y), visible), visible, block.conv2.norm, None)
        skip = h
        for op in block.skip or ():
            if isinstance(op, nn.AvgPool3d):
                skip = masked(op(skip), visible)
            else:
                skip = self.norm(masked(op.conv(skip), visible), visible, op.norm, None)
        return F.leaky_relu(y + skip, self.slope)

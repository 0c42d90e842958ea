"""The dense STU-Net encoder (Huang et al. 2023), module for module as in the STU-Net
code, so that its state_dict keys (``conv_blocks_context.{stage}.{block}.conv1.weight``
...) load into STU-Net / nnU-Net trainers. The sparse pretraining engine
(:mod:`anatomask_fast.models.sparse_encoder`) runs these same modules."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class STUNetSize:
    widths: tuple[int, ...]
    depth: int


STUNET_SIZES = {
    "tiny": STUNetSize((8, 16, 32, 64, 128), 1),
    "S": STUNetSize((16, 32, 64, 128, 256), 1),
    "B": STUNetSize((32, 64, 128, 256, 512), 1),
    "L": STUNetSize((64, 128, 256, 512, 1024), 2),
    "H": STUNetSize((96, 192, 384, 768, 1536), 3),
}


class BasicResBlock(nn.Module):
    """conv3x3x3 (stride) -> InstanceNorm -> LeakyReLU -> conv3x3x3 -> InstanceNorm,
    plus a 1x1x1 projection ``conv3`` when channels or stride change, add, LeakyReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.norm1 = nn.InstanceNorm3d(out_channels, affine=True)
        self.act1 = nn.LeakyReLU(0.01, inplace=True)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.norm2 = nn.InstanceNorm3d(out_channels, affine=True)
        self.conv3 = (nn.Conv3d(in_channels, out_channels, 1, stride=stride)
                      if in_channels != out_channels or stride != 1 else None)
        self.act2 = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        return self.act2(y + (self.conv3(x) if self.conv3 is not None else x))


class STUNetEncoder(nn.Module):
    """Five stages of residual blocks, stride 2 at the start of stages 1..4 (total
    downsampling 16). ``forward`` returns every stage's output, shallowest first."""

    downsampling = 16

    def __init__(self, in_channels: int = 1, widths: tuple[int, ...] = STUNET_SIZES["B"].widths,
                 depth: int = 1) -> None:
        super().__init__()
        stages = []
        for s, width in enumerate(widths):
            first = BasicResBlock(widths[s - 1] if s else in_channels, width, 1 if s == 0 else 2)
            stages.append(nn.Sequential(first, *(BasicResBlock(width, width)
                                                 for _ in range(depth - 1))))
        self.conv_blocks_context = nn.ModuleList(stages)

    @classmethod
    def from_size(cls, size: str, in_channels: int = 1) -> "STUNetEncoder":
        """One of :data:`STUNET_SIZES` ("tiny", "S", "B", "L", "H")."""
        if size not in STUNET_SIZES:
            raise ValueError(f"STUNetEncoder: unknown size {size!r}; expected one of "
                             f"{tuple(STUNET_SIZES)}")
        spec = STUNET_SIZES[size]
        return cls(in_channels, spec.widths, spec.depth)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.conv_blocks_context:
            x = stage(x)
            features.append(x)
        return features

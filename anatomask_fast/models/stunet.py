"""The dense STU-Net encoder (Huang et al. 2023), module for module as in the STU-Net
code, so that its state_dict keys (``conv_blocks_context.{stage}.{block}.conv1.weight``
...) load into STU-Net / nnU-Net trainers. The sparse pretraining engine
(:mod:`anatomask_fast.models.sparse_encoder`) runs these same modules.

STU-Net's trainers build six stages, ``dims = base * (1, 2, 4, 8, 16, 16)`` with
``depth`` blocks each; AnatoMask pretrains the first five (``widths``), so the
pretraining encoder has five stages and the segmentation network
(:class:`anatomask_fast.models.segmentation.STUNet`) six.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

Triple = tuple[int, int, int]


@dataclass(frozen=True)
class STUNetSize:
    base: int
    depth: int

    @property
    def dims(self) -> tuple[int, ...]:
        """The six stage widths of STU-Net's trainers."""
        return tuple(self.base * m for m in (1, 2, 4, 8, 16, 16))

    @property
    def widths(self) -> tuple[int, ...]:
        """The five stages AnatoMask pretrains."""
        return self.dims[:5]


# S, B, L, H: STUNetTrainer_small/_base/_large/_huge; tiny: this library's demo size.
STUNET_SIZES = {
    "tiny": STUNetSize(8, 1),
    "S": STUNetSize(16, 1),
    "B": STUNetSize(32, 1),
    "L": STUNetSize(64, 2),
    "H": STUNetSize(96, 3),
}


def triple(value: int | Sequence[int], name: str) -> Triple:
    """``value`` as three positive ints (an int is repeated); a ValueError naming ``name``."""
    values = (value,) * 3 if isinstance(value, int) else tuple(value)
    if len(values) != 3 or not all(isinstance(v, int) and v > 0 for v in values):
        raise ValueError(f"{name}: expected a positive int or three positive ints, got {value!r}")
    return values  # type: ignore[return-value]


class BasicResBlock(nn.Module):
    """conv (kernel, stride) -> InstanceNorm -> LeakyReLU -> conv (kernel) -> InstanceNorm,
    plus a 1x1x1 projection ``conv3`` (STU-Net: on every stage's first block; by default
    when channels or stride change), add, LeakyReLU. Padding ``kernel // 2``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int | Sequence[int] = 3,
        stride: int | Sequence[int] = 1,
        use_1x1conv: bool | None = None,
    ) -> None:
        super().__init__()
        kernel, stride = triple(kernel, "kernel"), triple(stride, "stride")
        padding = tuple(k // 2 for k in kernel)
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel, stride=stride, padding=padding)
        self.norm1 = nn.InstanceNorm3d(out_channels, affine=True)
        self.act1 = nn.LeakyReLU(0.01, inplace=True)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel, padding=padding)
        self.norm2 = nn.InstanceNorm3d(out_channels, affine=True)
        if use_1x1conv is None:
            use_1x1conv = in_channels != out_channels or stride != (1, 1, 1)
        self.conv3 = nn.Conv3d(in_channels, out_channels, 1, stride=stride) if use_1x1conv else None
        self.act2 = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        return self.act2(y + (self.conv3(x) if self.conv3 is not None else x))


def stage(
    in_channels: int,
    width: int,
    depth: int,
    kernel: Sequence[int] | int,
    stride: Sequence[int] | int,
) -> nn.Sequential:
    """One STU-Net stage: a first block with the stride and a ``conv3`` projection, then
    ``depth - 1`` blocks at ``width``."""
    return nn.Sequential(
        BasicResBlock(in_channels, width, kernel, stride, use_1x1conv=True),
        *(BasicResBlock(width, width, kernel) for _ in range(depth - 1)),
    )


class STUNetEncoder(nn.Module):
    """Stages of residual blocks, stride 2 (or ``strides[s - 1]``) at the start of stages
    1.. (five stages: total downsampling 16). ``forward`` returns every stage's output,
    shallowest first."""

    downsampling = 16

    def __init__(
        self,
        in_channels: int = 1,
        widths: tuple[int, ...] = STUNET_SIZES["B"].widths,
        depth: int = 1,
        strides: Sequence[Sequence[int]] | None = None,
        kernels: Sequence[Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        strides = [(2, 2, 2)] * (len(widths) - 1) if strides is None else list(strides)
        kernels = [(3, 3, 3)] * len(widths) if kernels is None else list(kernels)
        if len(strides) != len(widths) - 1 or len(kernels) != len(widths):
            raise ValueError(
                f"STUNetEncoder: {len(widths)} stages need {len(widths) - 1} "
                f"strides and {len(widths)} kernels, got {len(strides)} and "
                f"{len(kernels)}"
            )
        self.conv_blocks_context = nn.ModuleList(
            stage(
                widths[s - 1] if s else in_channels,
                width,
                depth,
                kernels[s],
                strides[s - 1] if s else 1,
            )
            for s, width in enumerate(widths)
        )

    @classmethod
    def from_size(cls, size: str, in_channels: int = 1) -> STUNetEncoder:
        """The five pretrained stages of one of :data:`STUNET_SIZES` ("tiny", "S", "B",
        "L", "H")."""
        spec = size_spec(size)
        return cls(in_channels, spec.widths, spec.depth)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for blocks in self.conv_blocks_context:
            x = blocks(x)
            features.append(x)
        return features


def size_spec(size: str) -> STUNetSize:
    if size not in STUNET_SIZES:
        raise ValueError(
            f"STU-Net size: unknown size {size!r}; expected one of {tuple(STUNET_SIZES)}"
        )
    return STUNET_SIZES[size]

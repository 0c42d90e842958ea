"""nnU-Net's Residual Encoder U-Net (``ResidualEncoderUNet`` of
dynamic-network-architectures, the network of nnU-Net's ResEnc M/L/XL presets and of
nnssl's pretraining), module for module and name for name, so that its state_dict
loads into nnU-Net and nnssl and theirs into it:

- ``encoder.stem.convs.0``: conv (kernel of stage 0, stride 1) -> InstanceNorm -> LeakyReLU;
- ``encoder.stages.{s}.blocks.{b}``: ``BasicBlockD`` (ResNet-D): ``conv1`` (conv with
  the stage's stride -> norm -> act), ``conv2`` (conv -> norm), ``skip`` (AvgPool by the
  stride when the block strides, then a 1x1x1 conv without bias -> norm when the
  channels change; identity otherwise), add, LeakyReLU;
- ``decoder.transpconvs.{s}`` (transposed conv, kernel = stride), ``decoder.stages.{s}``
  (concatenation with the skip, convs -> norm -> act), ``decoder.seg_layers.{s}``
  (1x1x1 heads, all of them returned under deep supervision, highest resolution first);
- ``decoder.encoder``: the decoder holds the encoder too, so every encoder tensor has a
  second name ``decoder.encoder.*`` (and every conv / norm a second one
  ``all_modules.0`` / ``all_modules.1``): nnU-Net's checkpoints list them all.

The architecture comes from an nnU-Net plans configuration
(``architecture.arch_kwargs``) or from a preset (:data:`RESENC_PRESETS`). The tests
build dynamic-network-architectures' class from the same plans and compare every name,
shape and output.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .plans import read_plans, resolve_configuration
from .stunet import Triple, triple

ARCH_CLASS = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
# How nnU-Net's planners write the operators (torch's module paths), and the arch_kwargs
# entries that name importable classes.
CONV_OP, NORM_OP, NONLIN = (
    "torch.nn.modules.conv.Conv3d",
    "torch.nn.modules.instancenorm.InstanceNorm3d",
    "torch.nn.LeakyReLU",
)
KWARGS_REQUIRING_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]
# Where nnssl and nnU-Net's pretrained-weights adaptation find the encoder, the stem and
# the input projection in the state_dict (the class's own attributes there).
KEY_TO_ENCODER, KEY_TO_STEM = "encoder.stages", "encoder.stem"
KEYS_TO_IN_PROJ = ("encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0")


@dataclass(frozen=True)
class ResEncArch:
    """One ResidualEncoderUNet: per stage its width, kernel, stride (the first is the
    stem stage's, usually (1, 1, 1)) and residual blocks; convs per decoder stage."""

    features: tuple[int, ...]
    kernels: tuple[Triple, ...]
    strides: tuple[Triple, ...]
    blocks: tuple[int, ...]
    decoder_convs: tuple[int, ...]
    conv_bias: bool = True
    eps: float = 1e-5
    slope: float = 1e-2

    def __post_init__(self) -> None:
        n = len(self.features)
        counts = {
            "kernel_sizes": len(self.kernels),
            "strides": len(self.strides),
            "n_blocks_per_stage": len(self.blocks),
        }
        if n < 2 or any(c != n for c in counts.values()) or len(self.decoder_convs) != n - 1:
            raise ValueError(
                f"ResidualEncoderUNet: {n} stages need as many kernel_sizes, "
                f"strides and n_blocks_per_stage and {n - 1} "
                f"n_conv_per_stage_decoder, got {counts} and "
                f"{len(self.decoder_convs)}"
            )
        if min(self.features) < 1 or min(self.blocks) < 1 or min(self.decoder_convs) < 1:
            raise ValueError(
                "ResidualEncoderUNet: features, blocks and decoder convs must be "
                f"positive, got {self.features}, {self.blocks}, "
                f"{self.decoder_convs}"
            )
        if any(k % 2 == 0 for kernel in self.kernels for k in kernel):
            raise ValueError(f"ResidualEncoderUNet: kernel sizes must be odd, got {self.kernels}")

    @property
    def stages(self) -> int:
        return len(self.features)

    def cumulative_stride(self, stage: int) -> Triple:
        """The down-sampling of ``stage``'s output relative to the input, per axis."""
        return tuple(math.prod(s[a] for s in self.strides[: stage + 1]) for a in range(3))

    @property
    def total_stride(self) -> Triple:
        return self.cumulative_stride(self.stages - 1)

    def arch_kwargs(self) -> dict:
        """nnU-Net's ``arch_kwargs`` of this network (plain values: JSON and
        ``weights_only`` loadable), exactly the keys nnssl's ``DynamicArchitecturePlans``
        has."""
        return {
            "n_stages": self.stages,
            "features_per_stage": list(self.features),
            "conv_op": CONV_OP,
            "kernel_sizes": [list(k) for k in self.kernels],
            "strides": [list(s) for s in self.strides],
            "n_blocks_per_stage": list(self.blocks),
            "n_conv_per_stage_decoder": list(self.decoder_convs),
            "conv_bias": self.conv_bias,
            "norm_op": NORM_OP,
            "norm_op_kwargs": {"eps": self.eps, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": NONLIN,
            "nonlin_kwargs": {
                "inplace": True,
                **({} if self.slope == 1e-2 else {"negative_slope": self.slope}),
            },
        }

    def architecture(self) -> dict:
        """A plans configuration's ``architecture`` entry for this network."""
        return {
            "network_class_name": ARCH_CLASS,
            "arch_kwargs": self.arch_kwargs(),
            "_kw_requires_import": list(KWARGS_REQUIRING_IMPORT),
        }

    @classmethod
    def from_arch_kwargs(cls, kwargs: Mapping, source: str = "arch_kwargs") -> ResEncArch:
        """The network of nnU-Net ``arch_kwargs`` (a ResEnc planner's); a ValueError
        naming ``source`` and the entry for anything this module does not build."""

        def op(key: str, expected: str) -> None:
            value = kwargs.get(key)
            name = value if isinstance(value, str) else getattr(value, "__name__", repr(value))
            if name.rsplit(".", 1)[-1] != expected.rsplit(".", 1)[-1]:
                raise ValueError(f"{source}: '{key}' must be {expected}, got {value!r}")

        op("conv_op", CONV_OP)
        op("norm_op", NORM_OP)
        op("nonlin", NONLIN)
        if kwargs.get("dropout_op") is not None:
            raise ValueError(f"{source}: 'dropout_op' must be None, got {kwargs['dropout_op']!r}")
        for key, default in (
            ("block", "BasicBlockD"),
            ("bottleneck_channels", None),
            ("stem_channels", None),
        ):
            value = kwargs.get(key, default)
            if value is not None and str(getattr(value, "__name__", value)).rsplit(".", 1)[
                -1
            ] != str(default):
                raise ValueError(
                    f"{source}: '{key}' {value!r} is not supported (the ResEnc "
                    f"presets use {default!r})"
                )
        norm = kwargs.get("norm_op_kwargs") or {}
        if not norm.get("affine", False):
            raise ValueError(f"{source}: 'norm_op_kwargs' must have affine=True, got {norm!r}")
        n = kwargs.get("n_stages")
        if not isinstance(n, int):
            raise ValueError(f"{source}: 'n_stages' must be an int, got {n!r}")

        def per_stage(key: str, count: int) -> list:
            value = kwargs.get(key)
            return [value] * count if isinstance(value, int) else list(value or [])

        try:
            return cls(
                tuple(int(f) for f in per_stage("features_per_stage", n)),
                tuple(triple(k, "kernel_sizes") for k in per_stage("kernel_sizes", n)),
                tuple(triple(s, "strides") for s in per_stage("strides", n)),
                tuple(int(b) for b in per_stage("n_blocks_per_stage", n)),
                tuple(int(c) for c in per_stage("n_conv_per_stage_decoder", n - 1)),
                bool(kwargs.get("conv_bias", False)),
                float(norm.get("eps", 1e-5)),
                float((kwargs.get("nonlin_kwargs") or {}).get("negative_slope", 1e-2)),
            )
        except (TypeError, ValueError) as error:
            raise ValueError(f"{source}: {error}") from None


@dataclass(frozen=True)
class ResEncPreset:
    arch: ResEncArch
    patch_size: Triple  # the planner's 3d_fullres patch size, the default crop


# What nnU-Net's ResEnc planners (nnunetv2 2.8.1, nnUNetPlannerResEncM/L/XL) write as
# 3d_fullres for volumes of 256^3 at 1 mm isotropic (the spacing nnssl pretrains at):
# one network, six stages (features min(32 * 2^s, 320), blocks 1, 3, 4, 6, 6, 6: also
# nnssl's fixed ResEnc-L), and a patch size per GPU budget. tests/test_resenc_model.py
# derives them again from the real planners.
_PLANNED = ResEncArch(
    features=(32, 64, 128, 256, 320, 320),
    kernels=((3, 3, 3),) * 6,
    strides=((1, 1, 1),) + ((2, 2, 2),) * 5,
    blocks=(1, 3, 4, 6, 6, 6),
    decoder_convs=(1,) * 5,
)
RESENC_PRESETS = {
    "resenc-m": ResEncPreset(_PLANNED, (128, 128, 128)),
    "resenc-l": ResEncPreset(_PLANNED, (192, 192, 192)),
    "resenc-xl": ResEncPreset(_PLANNED, (256, 224, 224)),
}


def arch_from_plans(
    plans: dict, configuration: str = "3d_fullres", *, source: str = "plans"
) -> tuple[ResEncArch, Triple]:
    """The ResidualEncoderUNet of a plans configuration and its patch size."""
    config = resolve_configuration(plans, configuration, source)
    architecture = config.get("architecture") or {}
    name = str(architecture.get("network_class_name", ""))
    if not name.endswith("ResidualEncoderUNet"):
        raise ValueError(
            f"{source}: configuration {configuration!r} builds {name or 'no network'}"
            f", not a ResidualEncoderUNet (plan it with nnUNetPlannerResEncM/L/XL)"
        )
    arch = ResEncArch.from_arch_kwargs(
        architecture.get("arch_kwargs") or {}, f"{source} ({configuration})"
    )
    patch = config.get("patch_size") or []
    if len(patch) != 3:
        raise ValueError(
            f"{source}: configuration {configuration!r} has patch_size {patch!r}; "
            "expected three sizes (a 3D configuration)"
        )
    return arch, tuple(int(p) for p in patch)


def load_arch(path: str | Path, configuration: str = "3d_fullres") -> tuple[ResEncArch, Triple]:
    return arch_from_plans(read_plans(path), configuration, source=str(path))


class ConvNormAct(nn.Module):
    """conv -> InstanceNorm (affine) [-> LeakyReLU]: dynamic-network-architectures'
    ``ConvDropoutNormReLU`` without dropout. Its layers are attributes (``conv``,
    ``norm``, ``nonlin``) and also the ``all_modules`` sequence, as there: each tensor
    has both names in the state_dict."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: Triple,
        stride: Triple,
        bias: bool,
        eps: float,
        slope: float | None,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv3d(
            in_channels,
            out_channels,
            kernel,
            stride,
            padding=[(k - 1) // 2 for k in kernel],
            bias=bias,
        )
        self.norm = nn.InstanceNorm3d(out_channels, eps=eps, affine=True)
        layers: list[nn.Module] = [self.conv, self.norm]
        if slope is not None:
            self.nonlin = nn.LeakyReLU(slope, inplace=True)
            layers.append(self.nonlin)
        self.all_modules = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_modules(x)


class ConvStack(nn.Module):
    """``StackedConvBlocks``: ``convs``, the first with the stride."""

    def __init__(
        self,
        count: int,
        in_channels: int,
        out_channels: int,
        kernel: Triple,
        stride: Triple,
        arch: ResEncArch,
    ) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            *(
                ConvNormAct(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    kernel,
                    stride if i == 0 else (1, 1, 1),
                    arch.conv_bias,
                    arch.eps,
                    arch.slope,
                )
                for i in range(count)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class BasicBlockD(nn.Module):
    """ResNet-D residual block: conv1 (stride) -> conv2 (no act), plus the skip (AvgPool
    by the stride when striding, then a 1x1x1 conv without bias and a norm when the
    channels change), add, LeakyReLU."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel: Triple, stride: Triple, arch: ResEncArch
    ) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(
            in_channels, out_channels, kernel, stride, arch.conv_bias, arch.eps, arch.slope
        )
        self.conv2 = ConvNormAct(
            out_channels, out_channels, kernel, (1, 1, 1), arch.conv_bias, arch.eps, None
        )
        self.nonlin2 = nn.LeakyReLU(arch.slope, inplace=True)
        self.stride = stride
        ops: list[nn.Module] = []
        if stride != (1, 1, 1):
            ops.append(nn.AvgPool3d(stride, stride))
        if in_channels != out_channels:
            ops.append(
                ConvNormAct(in_channels, out_channels, (1, 1, 1), (1, 1, 1), False, arch.eps, None)
            )
        self.skip = nn.Sequential(*ops) if ops else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.skip(x) if self.skip is not None else x
        out = self.conv2(self.conv1(x))
        out += residual
        return self.nonlin2(out)


class ResidualStage(nn.Module):
    """``StackedResidualBlocks``: ``blocks``, the first with the stage's stride."""

    def __init__(self, in_channels: int, stage: int, arch: ResEncArch) -> None:
        super().__init__()
        width, kernel = arch.features[stage], arch.kernels[stage]
        self.blocks = nn.Sequential(
            *(
                BasicBlockD(
                    in_channels if b == 0 else width,
                    width,
                    kernel,
                    arch.strides[stage] if b == 0 else (1, 1, 1),
                    arch,
                )
                for b in range(arch.blocks[stage])
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ResidualEncoder(nn.Module):
    """The stem and the stages; ``forward`` returns every stage's output (the skips),
    shallowest first."""

    def __init__(self, arch: ResEncArch, in_channels: int = 1) -> None:
        super().__init__()
        self.arch, self.in_channels = arch, in_channels
        self.stem = ConvStack(1, in_channels, arch.features[0], arch.kernels[0], (1, 1, 1), arch)
        self.stages = nn.Sequential(
            *(
                ResidualStage(arch.features[s - 1] if s else arch.features[0], s, arch)
                for s in range(arch.stages)
            )
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class UNetDecoder(nn.Module):
    """Transposed conv up-sampling, concatenation with the skip, convs, a head per
    level; holds the encoder (``decoder.encoder``) as nnU-Net's does."""

    def __init__(self, encoder: ResidualEncoder, num_classes: int, deep_supervision: bool) -> None:
        super().__init__()
        arch = encoder.arch
        self.deep_supervision = deep_supervision
        self.encoder = encoder
        levels = range(1, arch.stages)
        self.stages = nn.ModuleList(
            ConvStack(
                arch.decoder_convs[s - 1],
                2 * arch.features[-(s + 1)],
                arch.features[-(s + 1)],
                arch.kernels[-(s + 1)],
                (1, 1, 1),
                arch,
            )
            for s in levels
        )
        self.transpconvs = nn.ModuleList(
            nn.ConvTranspose3d(
                arch.features[-s],
                arch.features[-(s + 1)],
                arch.strides[-s],
                arch.strides[-s],
                bias=arch.conv_bias,
            )
            for s in levels
        )
        self.seg_layers = nn.ModuleList(
            nn.Conv3d(arch.features[-(s + 1)], num_classes, 1, 1, 0, bias=True) for s in levels
        )

    def forward(self, skips: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        x = skips[-1]
        outputs = []
        last = len(self.stages) - 1
        for s, (up, stage) in enumerate(zip(self.transpconvs, self.stages)):
            x = stage(torch.cat((up(x), skips[-(s + 2)]), 1))
            if self.deep_supervision or s == last:
                outputs.append(self.seg_layers[s](x))
        return outputs[::-1] if self.deep_supervision else outputs[0]


class ResidualEncoderUNet(nn.Module):
    """The segmentation network (nnU-Net's ResEnc presets). ``forward`` returns the
    logits at the input resolution, or with ``deep_supervision`` a list for every
    decoder level, highest resolution first."""

    key_to_encoder, key_to_stem, keys_to_in_proj = KEY_TO_ENCODER, KEY_TO_STEM, KEYS_TO_IN_PROJ

    def __init__(
        self,
        arch: ResEncArch,
        in_channels: int = 1,
        num_classes: int = 2,
        *,
        deep_supervision: bool = True,
    ) -> None:
        super().__init__()
        self.arch, self.in_channels, self.num_classes = arch, in_channels, num_classes
        self.encoder = ResidualEncoder(arch, in_channels)
        self.decoder = UNetDecoder(self.encoder, num_classes, deep_supervision)

    @property
    def deep_supervision(self) -> bool:
        return self.decoder.deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, value: bool) -> None:
        self.decoder.deep_supervision = value

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ResidualEncoderUNet: expected input (B, {self.in_channels}, D, H, "
                f"W), got {tuple(x.shape)}"
            )
        total = self.arch.total_stride
        if any(s % t for s, t in zip(x.shape[2:], total)):
            raise ValueError(
                f"ResidualEncoderUNet: the spatial shape {tuple(x.shape[2:])} must "
                f"be divisible by {total} (the product of the strides)"
            )
        if self.training and all(s == t for s, t in zip(x.shape[2:], total)):
            raise ValueError(
                f"ResidualEncoderUNet: the spatial shape {tuple(x.shape[2:])} "
                f"leaves one voxel at the deepest stage, where InstanceNorm needs "
                f"more: train on crops of twice the total stride {total} on an "
                f"axis at least"
            )
        return self.decoder(self.encoder(x))

    def initialize(self) -> ResidualEncoderUNet:
        initialize(self)
        return self


def initialize(network: nn.Module) -> None:
    """nnU-Net's initialization of a ResidualEncoderUNet (or its encoder): convolutions
    and transposed convolutions Kaiming-normal (LeakyReLU slope 0.01), biases zero, and
    each residual block's last norm zero (its branch starts as the identity)."""
    for module in network.modules():
        if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
            nn.init.kaiming_normal_(module.weight, a=1e-2)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, BasicBlockD):
            nn.init.zeros_(module.conv2.norm.weight)
            nn.init.zeros_(module.conv2.norm.bias)

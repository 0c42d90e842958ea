"""The networks the training jobs build, by name: STU-Net (``--network stunet``, sizes
``--size``) and nnU-Net's Residual Encoder U-Net (``--network resenc-m|resenc-l|
resenc-xl``: the preset's architecture and patch size, or with ``--plans`` a plans
file's own ResEnc configuration). For each: the pretraining network (sparse encoder,
densify, light decoder), the segmentation network, and the pretrained files a run
writes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .anatomask import AnatoMaskNet
from .plans import read_plans
from .resenc import (
    RESENC_PRESETS,
    ResEncArch,
    ResidualEncoder,
    ResidualEncoderUNet,
    initialize,
    load_arch,
)
from .resenc_export import (
    adaptation_plan,
    export_nnssl,
    export_nnunet,
    minimal_plans,
    pretrained_network,
)
from .sparse_resenc import SparseResidualEncoder
from .stunet import Triple

STUNET = "stunet"
NETWORKS = (STUNET, *RESENC_PRESETS)
# The light decoder's top width for the ResEnc encoders: the published AnatoMask
# decoder's (512 for STU-Net-B/L/H), halving per level (16 channels at full resolution
# under six stages, 32 under five).
RESENC_DECODER_WIDTH = 512


@dataclass(frozen=True)
class NetworkSpec:
    name: str  # "stunet" or a ResEnc preset's name
    size: str  # STU-Net's size (STU-Net only)
    arch: ResEncArch | None = None  # ResEnc only
    patch_size: Triple | None = None  # ResEnc: the preset's / plans' patch size
    plans: str | None = None  # the plans file the ResEnc comes from
    configuration: str = "3d_fullres"

    @property
    def is_stunet(self) -> bool:
        return self.name == STUNET

    def describe(self) -> str:
        if self.is_stunet:
            return f"STU-Net-{self.size}"
        source = f" from {self.plans} ({self.configuration})" if self.plans else ""
        return (
            f"ResidualEncoderUNet ({self.name}{source}): {len(self.arch.features)} stages "
            f"{list(self.arch.features)}, blocks {list(self.arch.blocks)}"
        )

    def signature(self) -> dict:
        """What a checkpoint records of the network (nothing extra for STU-Net, whose
        size the jobs record themselves)."""
        if self.is_stunet:
            return {}
        return {"network": self.name, "arch_kwargs": self.arch.arch_kwargs()}


def network_spec(
    network: str, size: str, plans: str | None = None, configuration: str = "3d_fullres"
) -> NetworkSpec:
    """The network of ``--network``, ``--size`` and ``--plans``; a ValueError naming the
    flag for a bad combination."""
    if network not in NETWORKS:
        raise ValueError(f"--network must be one of {', '.join(NETWORKS)}, got {network!r}")
    if network == STUNET:
        return NetworkSpec(STUNET, size, plans=plans, configuration=configuration)
    if plans:
        arch, patch = load_arch(plans, configuration)
    else:
        arch, patch = RESENC_PRESETS[network].arch, RESENC_PRESETS[network].patch_size
    return NetworkSpec(network, size, arch, patch, plans, configuration)


def spec_of(saved: dict) -> NetworkSpec:
    """The network a checkpoint's signature records."""
    name = saved.get("network", STUNET)
    if name == STUNET:
        return NetworkSpec(STUNET, saved.get("size", "B"))
    return NetworkSpec(
        name, saved.get("size", ""), ResEncArch.from_arch_kwargs(saved["arch_kwargs"], "checkpoint")
    )


def pretraining_network(
    spec: NetworkSpec,
    in_channels: int,
    *,
    per_sample_norm: bool = False,
    packed_stages: int | None = None,
    sync_bn: bool = False,
    decoder_width: int = RESENC_DECODER_WIDTH,
) -> AnatoMaskNet:
    """AnatoMask's pretraining network on ``spec``'s encoder (the encoder nnU-Net-
    initialized for a ResEnc, its light decoder ``decoder_width`` wide at the top)."""
    if spec.is_stunet:
        return AnatoMaskNet(
            spec.size,
            in_channels,
            per_sample_norm=per_sample_norm,
            packed_stages=packed_stages,
            sync_bn=sync_bn,
        )
    encoder = ResidualEncoder(spec.arch, in_channels)
    initialize(encoder)
    return AnatoMaskNet(
        spec.name,
        in_channels,
        per_sample_norm=per_sample_norm,
        sync_bn=sync_bn,
        encoder=SparseResidualEncoder(
            encoder, per_sample=per_sample_norm, packed_stages=packed_stages
        ),
        decoder_width=decoder_width,
    )


def segmentation_network(
    spec: NetworkSpec, in_channels: int, num_classes: int
) -> ResidualEncoderUNet:
    """The ResEnc segmentation network, nnU-Net-initialized (STU-Net's is built by the
    fine-tuning job with its memory options)."""
    return ResidualEncoderUNet(spec.arch, in_channels, num_classes).initialize()


def export_resenc(
    student: AnatoMaskNet,
    spec: NetworkSpec,
    out: Path,
    *,
    in_channels: int,
    crop: Triple,
    spacing: tuple[float, float, float] | None,
    modality: str,
    dataset_name: str,
    epochs: int,
    save,
    write_text,
) -> list[Path]:
    """The files of a ResEnc pretraining run: ``resenc_<name>_pretrained.pth`` (nnU-Net's
    layout, for ``-pretrained_weights``) and ``nnssl/checkpoint_final.pth`` +
    ``nnssl/adaptation_plan.json`` (nnssl's format)."""
    model = pretrained_network(student.encoder_state_dict(), spec.arch, in_channels)
    plans = (
        read_plans(spec.plans)
        if spec.plans
        else minimal_plans(spec.arch, in_channels, crop, spacing, modality, spec.configuration)
    )
    source = str(out / "checkpoint_latest.pt")
    tag = spec.name.replace("-", "_")
    nnunet = export_nnunet(
        model,
        out / f"{tag}_pretrained.pth",
        network=spec.name,
        plans=plans,
        configuration=spec.configuration,
        epochs=epochs,
        source=source,
        save=save,
    )
    plan = adaptation_plan(spec.arch, in_channels, crop, spacing, modality, dataset_name)
    nnssl = export_nnssl(
        model,
        out / "nnssl",
        plan,
        network=spec.name,
        epochs=epochs,
        source=source,
        save=save,
        write_text=write_text,
    )
    return [nnunet, nnssl]

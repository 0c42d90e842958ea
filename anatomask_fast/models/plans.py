"""What STU-Net's nnU-Net trainers take from an nnU-Net v2 plans file
(``nnUNetPlans.json``) for one configuration: the five strides
(``pool_op_kernel_sizes[1:]``, cut to five or padded with (1, 1, 1) as
``STUNetTrainer.build_network_architecture`` does), the patch size, the target spacing
and the normalization. STU-Net's trainers use 3x3x3 kernels whatever the plans say;
``plans_kernels=True`` takes the plans' ``conv_kernel_sizes`` instead (anisotropic
kernels such as (1, 3, 3); such a network no longer loads into STU-Net's trainers)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

Triple = tuple[int, int, int]
# nnU-Net's normalization scheme -> this library's modality (its pre-processing).
NORMALIZATION = {
    "CTNormalization": "CT",
    "ZScoreNormalization": "MR",
    "NoNormalization": "MR",
    "RescaleTo01Normalization": "MR",
}


@dataclass(frozen=True)
class PlansGeometry:
    strides: tuple[Triple, ...]  # five, one per down-sampling
    kernels: tuple[Triple, ...]  # six, one per stage
    patch_size: Triple
    spacing: tuple[float, float, float]
    modality: str  # CT or MR (z-score), from normalization_schemes[0]
    configuration: str


def resolve_configuration(plans: dict, name: str, source: str, seen: tuple[str, ...] = ()) -> dict:
    """One configuration with its ``inherits_from`` chain resolved (nnU-Net's rule: the
    child's keys override the parent's)."""
    configurations = plans.get("configurations")
    if not isinstance(configurations, dict) or name not in configurations:
        known = sorted(configurations) if isinstance(configurations, dict) else []
        raise ValueError(f"{source}: configuration {name!r} not found; the plans have {known}")
    if name in seen:
        raise ValueError(f"{source}: configurations inherit in a circle: {seen + (name,)}")
    found = dict(configurations[name])
    parent = found.pop("inherits_from", None)
    if parent is None:
        return found
    return {**resolve_configuration(plans, parent, source, seen + (name,)), **found}


def _triples(values, count: int, what: str, source: str) -> list[Triple]:
    try:
        triples = [tuple(int(v) for v in value) for value in values]
    except (TypeError, ValueError):
        triples = []
    if not triples or any(len(t) != 3 or min(t) < 1 for t in triples):
        raise ValueError(
            f"{source}: {what} must be a list of three positive ints per stage "
            f"(a 3D configuration), got {values!r}"
        )
    return triples[:count]


def geometry(
    plans: dict,
    configuration: str = "3d_fullres",
    *,
    plans_kernels: bool = False,
    source: str = "plans",
) -> PlansGeometry:
    """The network and pre-processing settings STU-Net's trainers read from ``plans``."""
    config = resolve_configuration(plans, configuration, source)
    arch = config.get("architecture", {}).get("arch_kwargs", {})
    strides = arch.get("strides", config.get("pool_op_kernel_sizes"))
    kernels = arch.get("kernel_sizes", config.get("conv_kernel_sizes"))
    if strides is None or kernels is None:
        raise ValueError(
            f"{source}: configuration {configuration!r} has no strides / kernel "
            "sizes (architecture.arch_kwargs or pool_op_kernel_sizes)"
        )
    strides = _triples(strides, 6, "the strides", source)[1:]
    strides += [(1, 1, 1)] * (5 - len(strides))
    if plans_kernels:
        kernels = _triples(kernels, 6, "the kernel sizes", source)
        kernels += [kernels[-1]] * (6 - len(kernels))
    else:
        kernels = [(3, 3, 3)] * 6
    patch = config.get("patch_size", [])
    if len(patch) != 3:
        raise ValueError(
            f"{source}: configuration {configuration!r} has patch_size {patch!r}; "
            "STU-Net is a 3D network (expected three sizes)"
        )
    schemes = config.get("normalization_schemes") or ["ZScoreNormalization"]
    if schemes[0] not in NORMALIZATION:
        raise ValueError(
            f"{source}: normalization {schemes[0]!r} is not one of {sorted(NORMALIZATION)}"
        )
    return PlansGeometry(
        tuple(strides),
        tuple(kernels),
        tuple(int(p) for p in patch),
        tuple(float(s) for s in config["spacing"]),
        NORMALIZATION[schemes[0]],
        configuration,
    )


def read_plans(path: str | Path) -> dict:
    """A plans file's content; FileNotFoundError / ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"plans file {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"plans file {path} is not JSON: {error}") from None


def load_geometry(
    path: str | Path, configuration: str = "3d_fullres", *, plans_kernels: bool = False
) -> PlansGeometry:
    return geometry(read_plans(path), configuration, plans_kernels=plans_kernels, source=str(path))


# How nnU-Net v2's default pre-processing resamples (its ExperimentPlanner's choice).
_RESAMPLING = {
    "resampling_fn_data": "resample_data_or_seg_to_shape",
    "resampling_fn_data_kwargs": {
        "is_seg": False,
        "order": 3,
        "order_z": 0,
        "force_separate_z": None,
    },
    "resampling_fn_seg": "resample_data_or_seg_to_shape",
    "resampling_fn_seg_kwargs": {
        "is_seg": True,
        "order": 1,
        "order_z": 0,
        "force_separate_z": None,
    },
    "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
    "resampling_fn_probabilities_kwargs": {
        "is_seg": False,
        "order": 1,
        "order_z": 0,
        "force_separate_z": None,
    },
}


def stunet_plans(
    *,
    size: str,
    dims: Sequence[int],
    depth: int,
    strides: Sequence[Triple],
    kernels: Sequence[Triple],
    patch_size: Sequence[int],
    spacing: Sequence[float] | None,
    schemes: Sequence[str],
    intensity: Sequence[dict] | None,
    median_shape: Sequence[int],
    batch_size: int,
    configuration: str = "3d_fullres",
    dataset_name: str = "anatomask_fast",
) -> dict:
    """An nnU-Net v2 plans dict for one STU-Net configuration, complete enough for both
    plans readers: nnU-Net 2.8.1's ``PlansManager`` / ``ConfigurationManager`` (the
    ``architecture`` entry) and STU-Net's nnU-Net 2.2 fork, whose trainers read the
    older flat keys (``pool_op_kernel_sizes``, ``conv_kernel_sizes``, ...; 2.8.1 keeps
    them untouched when ``architecture`` is there). ``strides``: five (the first
    stage's (1, 1, 1) is added); ``kernels``: six; ``schemes``: nnU-Net's normalization
    class per channel; ``intensity``: per channel the dataset's foreground mean, std
    and 0.5 / 99.5 percentiles (what ``CTNormalization`` reads), else None."""
    pools = [[1, 1, 1]] + [list(s) for s in strides]
    kernel_sizes = [list(k) for k in kernels]
    channels = len(schemes)
    config = {
        "data_identifier": f"{dataset_name}_{configuration}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": batch_size,
        "patch_size": list(patch_size),
        "median_image_size_in_voxels": [int(s) for s in median_shape],
        "spacing": list(spacing) if spacing is not None else [1.0, 1.0, 1.0],
        "normalization_schemes": list(schemes),
        "use_mask_for_norm": [False] * channels,
        **_RESAMPLING,
        "batch_dice": False,
        # nnU-Net 2.8.1 reads the network from here; STU-Net's trainers build their own.
        "architecture": {
            "network_class_name": "nnunetv2.training.nnUNetTrainer.STUNetTrainer.STUNet",
            "arch_kwargs": {
                "n_stages": 6,
                "features_per_stage": list(dims),
                "kernel_sizes": kernel_sizes,
                "strides": pools,
                "n_blocks_per_stage": [depth] * 6,
                "n_conv_per_stage_decoder": [depth] * 5,
            },
            "_kw_requires_import": [],
        },
        # STU-Net's nnU-Net 2.2 fork reads these.
        "UNet_class_name": "STUNet",
        "UNet_base_num_features": int(dims[0]),
        "unet_max_num_features": int(max(dims)),
        "n_conv_per_stage_encoder": [depth] * 6,
        "n_conv_per_stage_decoder": [depth] * 5,
        "num_pool_per_axis": [sum(s[i] > 1 for s in strides) for i in range(3)],
        "pool_op_kernel_sizes": pools,
        "conv_kernel_sizes": kernel_sizes,
    }
    properties = {
        str(c): {
            "mean": p["mean"],
            "std": p["std"],
            "percentile_00_5": p["lower"],
            "percentile_99_5": p["upper"],
        }
        for c, p in enumerate(intensity or [])
    }
    return {
        "dataset_name": dataset_name,
        "plans_name": f"anatomask_fast_STUNet_{size}",
        "original_median_spacing_after_transp": config["spacing"],
        "original_median_shape_after_transp": config["median_image_size_in_voxels"],
        "image_reader_writer": "NibabelIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {configuration: config},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": properties,
    }

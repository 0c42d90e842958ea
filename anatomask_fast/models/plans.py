"""What STU-Net's nnU-Net trainers take from an nnU-Net v2 plans file
(``nnUNetPlans.json``) for one configuration: the five strides
(``pool_op_kernel_sizes[1:]``, cut to five or padded with (1, 1, 1) as
``STUNetTrainer.build_network_architecture`` does), the patch size, the target spacing
and the normalization. STU-Net's trainers use 3x3x3 kernels whatever the plans say;
``plans_kernels=True`` takes the plans' ``conv_kernel_sizes`` instead (anisotropic
kernels such as (1, 3, 3); such a network no longer loads into STU-Net's trainers)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

Triple = tuple[int, int, int]
# nnU-Net's normalization scheme -> this library's modality (its pre-processing).
NORMALIZATION = {"CTNormalization": "CT", "ZScoreNormalization": "MR",
                 "NoNormalization": "MR", "RescaleTo01Normalization": "MR"}


@dataclass(frozen=True)
class PlansGeometry:
    strides: tuple[Triple, ...]          # five, one per down-sampling
    kernels: tuple[Triple, ...]          # six, one per stage
    patch_size: Triple
    spacing: tuple[float, float, float]
    modality: str                        # CT or MR (z-score), from normalization_schemes[0]
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
        raise ValueError(f"{source}: {what} must be a list of three positive ints per stage "
                         f"(a 3D configuration), got {values!r}")
    return triples[:count]


def geometry(plans: dict, configuration: str = "3d_fullres", *, plans_kernels: bool = False,
             source: str = "plans") -> PlansGeometry:
    """The network and pre-processing settings STU-Net's trainers read from ``plans``."""
    config = resolve_configuration(plans, configuration, source)
    arch = config.get("architecture", {}).get("arch_kwargs", {})
    strides = arch.get("strides", config.get("pool_op_kernel_sizes"))
    kernels = arch.get("kernel_sizes", config.get("conv_kernel_sizes"))
    if strides is None or kernels is None:
        raise ValueError(f"{source}: configuration {configuration!r} has no strides / kernel "
                         "sizes (architecture.arch_kwargs or pool_op_kernel_sizes)")
    strides = _triples(strides, 6, "the strides", source)[1:]
    strides += [(1, 1, 1)] * (5 - len(strides))
    if plans_kernels:
        kernels = _triples(kernels, 6, "the kernel sizes", source)
        kernels += [kernels[-1]] * (6 - len(kernels))
    else:
        kernels = [(3, 3, 3)] * 6
    patch = config.get("patch_size", [])
    if len(patch) != 3:
        raise ValueError(f"{source}: configuration {configuration!r} has patch_size {patch!r}; "
                         "STU-Net is a 3D network (expected three sizes)")
    schemes = config.get("normalization_schemes") or ["ZScoreNormalization"]
    if schemes[0] not in NORMALIZATION:
        raise ValueError(f"{source}: normalization {schemes[0]!r} is not one of "
                         f"{sorted(NORMALIZATION)}")
    return PlansGeometry(tuple(strides), tuple(kernels), tuple(int(p) for p in patch),
                         tuple(float(s) for s in config["spacing"]), NORMALIZATION[schemes[0]],
                         configuration)


def read_plans(path: str | Path) -> dict:
    """A plans file's content; FileNotFoundError / ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"plans file {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"plans file {path} is not JSON: {error}") from None


def load_geometry(path: str | Path, configuration: str = "3d_fullres", *,
                  plans_kernels: bool = False) -> PlansGeometry:
    return geometry(read_plans(path), configuration, plans_kernels=plans_kernels,
                    source=str(path))

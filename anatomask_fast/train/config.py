"""Run configuration: a dataclass per job whose fields are the command-line flags, each
declared once, as data (:func:`option`: type, default, choices, check, help, group),
saved as JSON in the run folder. ``add_arguments`` turns the fields into grouped
argparse flags that check their values at parse time; :func:`check` makes the same
checks, and those between flags, on a config built in Python."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..models.networks import NETWORKS

# The teacher's ranking rules (train/teacher.py), as --teacher-target's choices.
TEACHER_TARGETS = ("raw", "normalized", "centred", "relative")
# --help groups, in this order.
GROUPS = {
    "data": "data",
    "network": "network",
    "schedule": "schedule and optimizer",
    "masking": "masking (AnatoMask)",
    "validation": "validation",
    "runtime": "runtime",
    "output": "output",
}
SIZES = ("tiny", "S", "B", "L", "H")
# The pretraining encoder's total stride: a crop is a whole number of 16^3 patches.
PRETRAIN_PATCH = 16
# STU-Net's five strides of 2 without --plans: a fine-tuning crop is a multiple of 32.
FINETUNE_STRIDE = 32


class Check:
    """A flag value's type and range, usable as argparse's ``type=`` (it parses the
    text and names the expectation in the error) and on a value given in Python."""

    def __init__(self, kind: type, expected: str, ok: Callable[[Any], bool]) -> None:
        self.kind, self.expected, self.ok = kind, expected, ok
        self.__name__ = expected  # argparse names the type in some messages

    def __call__(self, text: Any) -> Any:
        try:
            value = self.kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {self.expected}, got {text!r}") from None
        if not self.ok(value):
            raise argparse.ArgumentTypeError(f"expected {self.expected}, got {text}")
        return value


POSITIVE_INT = Check(int, "a whole number >= 1", lambda v: v >= 1)
COUNT = Check(int, "a whole number >= 0", lambda v: v >= 0)
POSITIVE = Check(float, "a number > 0", lambda v: v > 0)
NONNEGATIVE = Check(float, "a number >= 0", lambda v: v >= 0)
FRACTION = Check(float, "a number in [0, 1]", lambda v: 0 <= v <= 1)
OPEN_FRACTION = Check(float, "a number in (0, 1)", lambda v: 0 < v < 1)
OVERLAP = Check(float, "a number in [0, 1)", lambda v: 0 <= v < 1)


def upper(text: str) -> str:
    return str(text).upper()


def option(
    default: Any,
    help: str,
    group: str,
    *,
    choices: tuple | None = None,
    check: Callable | None = None,
    shown: str | None = None,
    required: bool = False,
) -> Any:
    """A flag: a dataclass field carrying its argparse declaration. ``check`` parses
    and range-checks one value (:class:`Check`; ``upper`` for case-insensitive
    choices); ``shown`` is the default as ``--help`` gives it where it depends on other
    flags (the field's default is then None)."""
    assert group in GROUPS, group
    return dataclasses.field(
        default=default,
        metadata=dict(
            help=help, group=group, choices=choices, check=check, shown=shown, required=required
        ),
    )


# ---- options several jobs share (a fresh field each time)
def _modality() -> Any:
    return option(
        "CT",
        "modality of a plain folder or paired folders: picks the normalization "
        "(an nnU-Net dataset's dataset.json 'channel_names' decides there)",
        "data",
        choices=("CT", "MR", "PET"),
        check=upper,
    )


def _ct_normalization() -> Any:
    return option(
        "dataset",
        "CT normalization: 'dataset' as nnU-Net (clip to the dataset's "
        "foreground 0.5/99.5 percentiles, z-score with its mean and std) or "
        "'volume' (each volume its own)",
        "data",
        choices=("dataset", "volume"),
    )


def _spacing(shown: str = "none: the volumes' own") -> Any:
    return option(
        None, "resample to this voxel spacing, in mm (x y z)", "data", check=POSITIVE, shown=shown
    )


def _amp() -> Any:
    return option(
        "none",
        "mixed precision: bf16 or fp16 autocast, or none (the input's dtype)",
        "runtime",
        choices=("none", "bf16", "fp16"),
    )


def _device() -> Any:
    return option(
        "auto",
        "device: cuda when available (auto), cpu or cuda",
        "runtime",
        choices=("auto", "cpu", "cuda"),
    )


@dataclasses.dataclass
class TrainingOptions:
    """What pretraining and fine-tuning share: data, run control, checkpoints."""

    data: str | None = option(
        None,
        "training data (see the job's description)",
        "data",
        shown="the embedded demonstration phantom",
    )
    modality: str = _modality()
    ct_normalization: str = _ct_normalization()
    cache: str | None = option(
        None,
        "the store built from a raw --data",
        "data",
        shown="$ANATOMASK_CACHE/KEY, else OUT/../.store/KEY",
    )
    preprocess_workers: int | None = option(
        None,
        "processes building the store",
        "data",
        check=COUNT,
        shown="4; demo 0: in this process",
    )
    augmentation: str | None = option(
        None,
        "training augmentation: nnunet (nnU-Net v2's), light (mirroring only) or none",
        "data",
        choices=("nnunet", "light", "none"),
        shown="nnunet; demo light",
    )
    spacing: tuple[float, float, float] | None = _spacing()
    phantom_cases: int = option(
        8, "volumes of the embedded demonstration phantom", "data", check=POSITIVE_INT
    )
    size: str | None = option(
        None,
        "STU-Net size (tiny is this library's demo size, base 8)",
        "network",
        choices=SIZES,
        shown="B; demo tiny",
    )
    epochs: int | None = option(
        None, "epochs", "schedule", check=POSITIVE_INT, shown="1000; demo 4"
    )
    steps_per_epoch: int | None = option(
        None,
        "full batches per epoch",
        "schedule",
        check=POSITIVE_INT,
        shown="250 as nnU-Net; demo: cases // batch size",
    )
    min_lr: float = option(
        0.0, "end of the cosine learning-rate decay", "schedule", check=NONNEGATIVE
    )
    weight_decay: float = option(1e-5, "AdamW weight decay", "schedule", check=NONNEGATIVE)
    clip_grad: float = option(12.0, "gradient-norm clipping", "schedule", check=POSITIVE)
    amp: str = _amp()
    workers: int = option(
        2, "DataLoader worker processes (0: load in this process)", "runtime", check=COUNT
    )
    seed: int = option(
        0, "seed of every random draw (data, masks, augmentation)", "runtime", check=COUNT
    )
    device: str = _device()
    resume: bool = option(False, "continue from the run folder's checkpoint_latest.pt", "runtime")
    stop_after_steps: int = option(
        0, "stop (resumably) after N steps in all; 0: never", "runtime", check=COUNT
    )
    out: str = option("runs/train", "run folder (config, checkpoints, logs)", "output")
    latest_every_steps: int = option(
        0,
        "also write checkpoint_latest.pt every N steps (0: at each epoch's end only)",
        "output",
        check=COUNT,
    )

    @property
    def demo(self) -> bool:
        return self.data is None

    def data_defaults(self) -> dict:
        """Data-pipeline defaults: nnU-Net's for real data, light and quick for the demo
        (its steps per epoch: one pass over its cases, chosen by the job)."""
        demo = self.demo
        return {
            "preprocess_workers": 0 if demo else 4,
            "augmentation": "light" if demo else "nnunet",
            **({} if demo else {"steps_per_epoch": 250}),
        }

    def resolved(self) -> TrainingOptions:
        """The config with the defaults that depend on other flags filled in."""
        return dataclasses.replace(
            self, **{k: v for k, v in self.defaults().items() if getattr(self, k) is None}
        )

    def defaults(self) -> dict:
        raise NotImplementedError


@dataclasses.dataclass
class PretrainConfig(TrainingOptions):
    """AnatoMask pretraining. Defaults follow the published setting; with no --data the
    run is the embedded demonstration (phantom, tiny model, a few epochs)."""

    data: str | None = option(
        None,
        "NIfTI folder, nnU-Net raw dataset, nnU-Net pre-processed "
        "folder (nnUNetPlans_3d_fullres) or a store",
        "data",
        shown="the embedded demonstration phantom",
    )
    crop: tuple[int, int, int] | None = option(
        None,
        f"crop size (x y z), each a multiple of the {PRETRAIN_PATCH}-voxel patch",
        "data",
        check=POSITIVE_INT,
        shown="112 112 128; demo 64 64 64; ResEnc: the preset's or plans' patch size",
    )
    network: str = option(
        "stunet",
        "stunet (its --size) or nnU-Net's Residual Encoder U-Net: "
        "resenc-m, resenc-l, resenc-xl (the preset's network and patch size, "
        "or with --plans the plans')",
        "network",
        choices=NETWORKS,
    )
    plans: str | None = option(
        None,
        "ResEnc: nnUNetResEncUNet{M,L,XL}Plans.json: the "
        "configuration's own network, strides, kernels and patch size "
        "(the default crop)",
        "network",
        shown="none: the preset",
    )
    configuration: str = option("3d_fullres", "the plans' configuration", "network")
    per_sample_norm: bool = option(
        False,
        "sparse-norm statistics per sample (a departure) "
        "instead of pooled over the batch (published)",
        "network",
    )
    batch_size: int | None = option(
        None, "volumes per step and process", "schedule", check=POSITIVE_INT, shown="4; demo 2"
    )
    lr: float = option(1e-4, "AdamW base learning rate", "schedule", check=POSITIVE)
    warmup_epochs: int | None = option(
        None,
        "linear warm-up epochs (the learning rate is set once per epoch)",
        "schedule",
        check=COUNT,
        shown="20; demo 1",
    )
    warmup_start_lr: float = option(
        1e-6,
        "learning rate of epoch 0, rising linearly to --lr over the warm-up",
        "schedule",
        check=NONNEGATIVE,
    )
    decay_exempt: bool = option(
        False,
        "no weight decay on biases, norms and mask tokens (a "
        "departure; published: decay on every parameter)",
        "schedule",
    )
    ema_start: float = option(
        0.999,
        "EMA teacher decay of epoch 0, rising linearly over the first E // 4 epochs",
        "schedule",
        check=FRACTION,
    )
    ema_end: float = option(
        0.9999, "EMA teacher decay from epoch E // 4 on", "schedule", check=FRACTION
    )
    mask_ratio: float = option(0.6, "share of hidden patches", "masking", check=OPEN_FRACTION)
    hard_schedule: str = option(
        "linear",
        "masking dynamics: linear (easy to hard, published), "
        "hard_to_easy, cosine, constant, or none (plain random masks "
        "as SparK / nnssl: no teacher pass)",
        "masking",
        choices=("linear", "hard_to_easy", "cosine", "constant", "none"),
    )
    hard_max: float = option(
        0.5,
        "the schedule's top hard share (constant: its value); "
        "hard_frac is capped at it (the published linear formula "
        "0.5 (e + 1) / (E - 1) exceeds 0.5 at the last epoch, and reaches "
        "1.0 with 2 epochs) except under --reference-compatible",
        "masking",
        check=FRACTION,
    )
    schedule_by: str = option(
        "epoch",
        "hard_frac changes per epoch (published) or per step",
        "masking",
        choices=("epoch", "step"),
    )
    reference_compatible: bool = option(
        False,
        "exactly the published step: the uncapped "
        "hard_frac formula; refuses any other --teacher-target, "
        "--teacher-foreground, --per-sample-norm, "
        "--decay-exempt, --hard-schedule none and a network "
        "other than STU-Net",
        "masking",
    )
    teacher_target: str = option(
        "raw",
        "the teacher's per-patch error ranking the patches: raw "
        "(published), normalized, centred (without its mean offset) "
        "or relative (over the patch variance); see train/teacher.py",
        "masking",
        choices=TEACHER_TARGETS,
    )
    teacher_foreground: bool = option(
        False,
        "weight the teacher's errors by the patch's share of "
        "voxels above the sample's minimum (air and padding rank "
        "last; a departure)",
        "masking",
    )
    guidance_data: str | None = option(
        None,
        "labelled volumes (a labelled folder or store): "
        "measure the teacher's guidance on them (metrics.jsonl, "
        "previews/guidance.png)",
        "output",
        shown="none",
    )
    guidance_every: int = option(
        0,
        "with --guidance-data: every N steps (0: at every epoch's end), and at initialization",
        "output",
        check=COUNT,
    )
    out: str = option(
        "runs/pretrain", "run folder (config, checkpoints, encoder.pt, previews, logs)", "output"
    )
    save_every: int = option(
        10, "also keep checkpoint_epoch_NNNN.pt every N epochs (0: never)", "output", check=COUNT
    )
    preview_every: int = option(1, "PNG previews every N epochs (0: never)", "output", check=COUNT)

    def defaults(self) -> dict:
        demo = self.demo
        stunet = self.network == "stunet"  # a ResEnc's default crop is its patch size
        return dict(
            size="tiny" if demo else "B",
            crop=None if not stunet else (64, 64, 64) if demo else (112, 112, 128),
            batch_size=2 if demo else 4,
            epochs=4 if demo else 1000,
            warmup_epochs=1 if demo else 20,
            **self.data_defaults(),
        )


@dataclasses.dataclass
class PreprocessConfig:
    """Pre-processes a raw dataset (NIfTI folder, nnU-Net raw dataset, paired images/ and
    labels/) once into a store of chunked, compressed arrays that training reads crops
    from (--data STORE). Resumable; under torchrun each rank takes its share."""

    data: str | None = option(None, "raw dataset folder", "data", required=True)
    spacing: tuple[float, float, float] | None = _spacing()
    modality: str = _modality()
    ct_normalization: str = _ct_normalization()
    labels: bool = option(
        False,
        "also store label maps (for finetune: give it the same --data and this store as --cache)",
        "data",
    )
    workers: int = option(
        4, "processes (per rank); 0 or 1: in this process", "runtime", check=COUNT
    )
    out: str | None = option(None, "store folder (manifest.json, cases/)", "output", required=True)


DEMO_ENCODER = "runs/pretrain/encoder.pt"  # what the embedded pretraining writes


@dataclasses.dataclass
class FinetuneConfig(TrainingOptions):
    """STU-Net segmentation fine-tuning, nnU-Net style, from AnatoMask encoder weights
    (--pretrained: encoder.pt or a pretraining checkpoint) or from scratch. With no
    --data, the embedded demonstration (labelled phantom, tiny model, a few minutes on
    a CPU) starting from the embedded pretraining's encoder when it exists."""

    data: str | None = option(
        None,
        "nnU-Net raw dataset (imagesTr, labelsTr, dataset.json) or "
        "paired images/ + labels/ folders",
        "data",
        shown="the embedded labelled phantom",
    )
    crop: tuple[int, int, int] | None = option(
        None,
        f"crop (patch) size (x y z); without --plans each a multiple of "
        f"{FINETUNE_STRIDE}, with --plans of the plans' strides",
        "data",
        check=POSITIVE_INT,
        shown="112 112 128; demo 32 32 32; --plans: its patch size",
    )
    spacing: tuple[float, float, float] | None = _spacing(
        "none: the volumes' own; demo 3 3 4; --plans: its spacing"
    )
    foreground: float | None = option(
        None,
        "share of crops centred on a labelled voxel",
        "data",
        check=FRACTION,
        shown="0.33; demo 0.5",
    )
    val_fraction: float = option(
        0.2,
        "share of cases held out for validation (the split is saved in splits.json)",
        "data",
        check=OPEN_FRACTION,
    )
    pretrained: str | None = option(
        None,
        "encoder weights: a pretraining encoder.pt, "
        "checkpoint or stunet_SIZE_pretrained.pth (ResEnc: "
        "resenc_*_pretrained.pth, an nnssl checkpoint_final.pth "
        "or checkpoint_latest.pt)",
        "network",
        shown=f"demo: {DEMO_ENCODER} when it exists",
    )
    from_scratch: bool = option(
        False,
        "start from random weights (the demo otherwise takes the embedded pretraining's encoder)",
        "network",
    )
    network: str = option(
        "stunet",
        "stunet (its --size) or nnU-Net's ResidualEncoderUNet: "
        "resenc-m, resenc-l, resenc-xl (the preset's, or with --plans the "
        "plans' own network)",
        "network",
        choices=NETWORKS,
    )
    plans: str | None = option(
        None,
        "nnUNetPlans.json (ResEnc: nnUNetResEncUNet{M,L,XL}"
        "Plans.json): patch size, spacing, strides, normalization",
        "network",
        shown="none: strides (2, 2, 2)",
    )
    configuration: str = option("3d_fullres", "the plans' configuration", "network")
    plans_kernels: bool = option(
        False, "the plans' kernel sizes (STU-Net's trainers use 3x3x3)", "network"
    )
    fused: bool = option(
        True,
        "fused norm + activation recomputed in backward, no stored concatenations (memory)",
        "network",
    )
    checkpointing: bool | None = option(
        None,
        "recompute encoder stages and decoder levels in backward (memory)",
        "network",
        shown="on; demo off",
    )
    recompute_levels: int = option(
        0, "with --checkpointing: only the N highest resolutions (0: all)", "network", check=COUNT
    )
    batch_size: int = option(2, "crops per step and process", "schedule", check=POSITIVE_INT)
    epochs: int | None = option(
        None, "epochs", "schedule", check=POSITIVE_INT, shown="1000; demo 80"
    )
    lr: float | None = option(
        None,
        "AdamW peak learning rate (cosine decay, no warm-up)",
        "schedule",
        check=POSITIVE,
        shown="1e-4; demo 1e-3",
    )
    val_every: int | None = option(
        None,
        "validate every N epochs (and after the last)",
        "validation",
        check=POSITIVE_INT,
        shown="1; demo: after the last epoch only",
    )
    sw_overlap: float = option(
        0.5, "sliding-window overlap in validation", "validation", check=OVERLAP
    )
    out: str = option(
        "runs/finetune", "run folder (config, split, checkpoints, overlays, logs)", "output"
    )

    def defaults(self) -> dict:
        demo = self.demo
        # The demo: the phantom resampled to 3 x 3 x 4 mm (48 x 48 x 40 voxels), 32^3
        # crops, 240 steps, no recomputation (measured together: a step 0.45 s instead of
        # 4 s), validated once at the end (sliding windows cost steps). Mean Dice 0.91 after
        # 240 steps from scratch or pretrained (spleen 0.89-0.90); 0.73 / 0.63 after 180
        # (spleen 0.41 / 0.12). At 64^3 and 1.5 mm, 18 steps at 3e-3 collapsed to background.
        epochs = self.epochs or (80 if demo else 1000)
        return dict(
            size="tiny" if demo else "B",
            crop=None
            if self.plans or self.network != "stunet"
            else (32, 32, 32)
            if demo
            else (112, 112, 128),
            spacing=(3.0, 3.0, 4.0) if demo and not self.plans else None,
            epochs=epochs,
            lr=1e-3 if demo else 1e-4,
            val_every=epochs if demo else 1,
            foreground=0.5 if demo else 0.33,
            checkpointing=not demo,
            **self.data_defaults(),
        )


@dataclasses.dataclass
class PredictConfig:
    """Label maps (NIfTI, with each input's affine and header) for volumes, pre-processed
    as in training, by sliding-window inference (Gaussian weighting)."""

    input: tuple[str, ...] | None = option(
        None,
        "volumes: .nii/.nii.gz files, folders of them (a file per case, or nnU-Net "
        "CASE_XXXX channel files), or both",
        "data",
        required=True,
    )
    checkpoint: str = option(
        "runs/finetune/checkpoint_best.pt", "a fine-tuning checkpoint", "network"
    )
    overlap: float = option(0.5, "sliding-window overlap", "runtime", check=OVERLAP)
    mirroring: bool = option(
        True,
        "test-time mirroring over the checkpoint's allowed axes "
        "(nnU-Net's default; 8 passes for 3 axes)",
        "runtime",
    )
    amp: str = _amp()
    device: str = _device()
    output: str = option("predictions", "folder for the label maps (CASE.nii.gz)", "output")


def _flag_type(hint: Any) -> tuple[Any, int | str | None]:
    """argparse type and nargs of a field's annotation."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    if typing.get_origin(base) is tuple:
        inner = typing.get_args(base)
        if len(inner) == 2 and inner[1] is Ellipsis:
            return inner[0], "+"
        return inner[0], len(inner)
    return base, None


def _default_text(field: dataclasses.Field) -> str:
    shown = field.metadata.get("shown")
    if shown is not None:
        return shown
    if isinstance(field.default, bool):
        return "on" if field.default else "off"
    if isinstance(field.default, tuple):
        return " ".join(str(v) for v in field.default)
    return str(field.default)


def add_arguments(parser: argparse.ArgumentParser, config_type: type) -> None:
    """One flag per field, in the field's group, with its choices, its check as the
    type and its default in the help."""
    hints = typing.get_type_hints(config_type)
    groups: dict[str, argparse._ArgumentGroup] = {}
    fields = sorted(
        dataclasses.fields(config_type), key=lambda f: list(GROUPS).index(f.metadata["group"])
    )
    for field in fields:
        meta = field.metadata
        group = groups.get(meta["group"])
        if group is None:
            group = groups[meta["group"]] = parser.add_argument_group(
                f"{GROUPS[meta['group']]} options"
            )
        flag = "--" + field.name.replace("_", "-")
        kind, nargs = _flag_type(hints[field.name])
        text = meta["help"].replace("%", "%%")  # argparse formats help with %
        text += " (required)" if meta["required"] else f" (default: {_default_text(field)})"
        if kind is bool:
            action = group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=field.default
            )
            action.help = text  # without the "(default: True)" some versions add
            continue
        group.add_argument(
            flag,
            type=meta["check"] or kind,
            nargs=nargs,
            default=field.default,
            choices=meta["choices"],
            required=meta["required"],
            help=text,
            metavar=_metavar(field, kind, nargs),
        )


def _metavar(field: dataclasses.Field, kind: type, nargs: int | str | None) -> Any:
    """Choices in braces, X Y Z for triples, N for whole numbers, V for other numbers,
    else the flag's name."""
    if field.metadata["choices"]:
        return "{" + ",".join(field.metadata["choices"]) + "}"
    if nargs == 3:
        return ("X", "Y", "Z")
    return {int: "N", float: "V"}.get(kind, field.name.upper())


def from_arguments(namespace: argparse.Namespace, config_type: type):
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(config_type)}
    for name, value in values.items():
        if isinstance(value, list):
            values[name] = tuple(value)
    return config_type(**values)


def check(config: Any) -> None:
    """The flag checks of ``add_arguments`` on a config built in Python, then the rules
    between flags; a ValueError naming the flag. Run on a resolved config, before any
    work."""
    for field in dataclasses.fields(config):
        value, meta = getattr(config, field.name), field.metadata
        flag = "--" + field.name.replace("_", "-")
        if value is None:
            if meta["required"]:
                raise ValueError(f"argument {flag} is required")
            continue
        values = value if isinstance(value, tuple) else (value,)
        for item in values:
            if meta["check"] is not None and not isinstance(item, bool):
                try:
                    item = meta["check"](item)
                except argparse.ArgumentTypeError as error:
                    raise ValueError(f"argument {flag}: {error}") from None
            if meta["choices"] is not None and item not in meta["choices"]:
                raise ValueError(
                    f"argument {flag}: invalid choice: {item!r} (choose from "
                    f"{', '.join(map(repr, meta['choices']))})"
                )
    if isinstance(config, PretrainConfig):
        _check_pretrain(config)
    if isinstance(config, FinetuneConfig):
        _check_finetune(config)


def _check_multiple(flag: str, crop: tuple[int, ...], step: tuple[int, ...], why: str) -> None:
    if any(c % m for c, m in zip(crop, step)):
        multiple = str(step[0]) if len(set(step)) == 1 else " x ".join(map(str, step))
        raise ValueError(
            f"argument {flag}: each size must be a multiple of {multiple} "
            f"({why}); got {' '.join(map(str, crop))}"
        )


def _check_pretrain(config: PretrainConfig) -> None:
    if config.plans and config.network == "stunet":
        raise ValueError(
            "argument --plans: describes a ResEnc network (--network resenc-m, "
            "resenc-l or resenc-xl); STU-Net pretraining takes --size"
        )
    if config.crop is not None:
        _check_multiple(
            "--crop",
            config.crop,
            (PRETRAIN_PATCH,) * 3,
            "the masking patch: the encoder's total stride",
        )
    if config.reference_compatible:
        departures = [
            flag
            for flag, on in (
                (f"--teacher-target {config.teacher_target}", config.teacher_target != "raw"),
                ("--teacher-foreground", config.teacher_foreground),
                ("--per-sample-norm", config.per_sample_norm),
                ("--decay-exempt", config.decay_exempt),
                ("--hard-schedule none", config.hard_schedule == "none"),
                (f"--network {config.network}", config.network != "stunet"),
            )
            if on
        ]
        if departures:
            raise ValueError(
                f"argument --reference-compatible: the published step cannot be "
                f"combined with {', '.join(departures)}"
            )


def _check_finetune(config: FinetuneConfig) -> None:
    if config.recompute_levels and not config.checkpointing:
        raise ValueError("argument --recompute-levels: needs --checkpointing")
    strides: tuple[int, ...] = (FINETUNE_STRIDE,) * 3
    what = "STU-Net's total stride: five strides of 2 without --plans"
    if config.plans:
        from ..models.networks import network_spec
        from ..models.plans import load_geometry

        try:
            if config.network == "stunet":
                per_stage = load_geometry(
                    config.plans, config.configuration, plans_kernels=config.plans_kernels
                ).strides
            else:
                per_stage = network_spec(
                    config.network, "", config.plans, config.configuration
                ).arch.strides
        except (OSError, ValueError) as error:
            raise ValueError(f"argument --plans: {error}") from None
        strides = tuple(math.prod(s[i] for s in per_stage) for i in range(3))
        what = f"the total stride per axis of {config.plans}"
    if config.crop is not None:
        _check_multiple("--crop", config.crop, strides, what)


def save(config: Any, path: Path) -> None:
    from .checkpoint import atomic_write_text

    atomic_write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n", path)

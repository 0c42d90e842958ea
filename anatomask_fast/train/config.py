"""Run configuration: a dataclass per job whose fields are the command-line flags,
saved as JSON in the run folder."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import typing
from pathlib import Path
from typing import Any


@dataclasses.dataclass
class PretrainConfig:
    """AnatoMask pretraining. Defaults follow the published setting; with no --data the
    run is the embedded demonstration (phantom, tiny model, a few epochs)."""

    data: str | None = None           # NIfTI folder, nnU-Net raw dataset, nnU-Net pre-processed folder (nnUNetPlans_3d_fullres) or a store; None: phantom
    modality: str = "CT"              # CT, MR or PET (a plain folder; nnU-Net: dataset.json)
    ct_normalization: str = "dataset"  # CT: dataset (nnU-Net: dataset-wide foreground percentiles, mean, std) or volume
    cache: str | None = None          # store of a raw --data (default: $ANATOMASK_CACHE/KEY, else OUT/../.store/KEY)
    preprocess_workers: int | None = None  # processes building the store (default 4, demo 0: in this process)
    augmentation: str | None = None   # nnunet, light (mirroring) or none (default nnunet, demo light)
    out: str = "runs/pretrain"        # run folder (config, checkpoints, encoder.pt, logs)
    size: str | None = None           # tiny, S, B, L, H (default: B, tiny for the demo)
    network: str = "stunet"           # stunet (--size) or nnU-Net's Residual Encoder U-Net: resenc-m, resenc-l, resenc-xl (the preset's network and patch size, or with --plans the plans')
    plans: str | None = None          # ResEnc: nnUNetResEncUNet{M,L,XL}Plans.json: the configuration's own network, strides, kernels and patch size (the default crop)
    configuration: str = "3d_fullres"  # the plans' configuration
    crop: tuple[int, int, int] | None = None   # default 112 112 128 (demo: 64 64 64; ResEnc: the preset's or plans' patch size)
    spacing: tuple[float, float, float] | None = None   # resample to this spacing (mm); default: none
    batch_size: int | None = None     # per process (default 4, demo 2)
    epochs: int | None = None         # default 1000 (demo 4)
    steps_per_epoch: int | None = None  # full batches per epoch (default 250 as nnU-Net; demo: cases // batch)
    mask_ratio: float = 0.6           # share of hidden patches
    hard_schedule: str = "linear"     # linear (easy to hard), hard_to_easy, cosine, constant, none (plain random masks as SparK / nnssl: no teacher pass)
    hard_max: float = 0.5             # the schedule's top hard_frac (constant: its value); hard_frac is capped at it (the published linear formula 0.5 * (e + 1) / (E - 1) exceeds it at the last epoch, and reaches 1.0 with 2 epochs), except under --reference-compatible
    schedule_by: str = "epoch"        # epoch (as the reference) or step
    reference_compatible: bool = False  # exactly the published step: also the uncapped hard_frac formula; forces --teacher-target raw, no --teacher-foreground, no --per-sample-norm, no --decay-exempt
    teacher_target: str = "raw"       # the teacher's per-patch error ranking the patches: raw (published), normalized, centred (without its mean offset) or relative (over the patch variance); see train/teacher.py
    teacher_foreground: bool = False  # weight the teacher's errors by the patch's share of voxels above the sample's minimum (air and padding rank last; a departure)
    guidance_data: str | None = None  # labelled volumes (a labelled folder or store): measure the teacher's guidance on them (metrics.jsonl, previews/guidance.png)
    guidance_every: int = 0           # with --guidance-data: every N steps (0: at every epoch's end), and at initialization
    per_sample_norm: bool = False     # sparse-norm statistics per sample (as the dense network at fine-tuning; a departure) instead of pooled over the batch (published)
    lr: float = 1e-4                  # AdamW base learning rate
    warmup_start_lr: float = 1e-6     # learning rate of epoch 0, rising linearly to --lr over the warm-up
    min_lr: float = 0.0               # end of the cosine decay (lightning-bolts' eta_min)
    weight_decay: float = 1e-5        # AdamW weight decay, on every parameter (published)
    decay_exempt: bool = False        # no weight decay on biases, norms and mask tokens (a departure)
    warmup_epochs: int | None = None  # default 20 (demo 1); the learning rate is set once per epoch
    clip_grad: float = 12.0           # gradient-norm clipping
    ema_start: float = 0.999          # EMA teacher decay of epoch 0, rising linearly over the first E // 4 epochs
    ema_end: float = 0.9999           # EMA teacher decay from epoch E // 4 on
    amp: str = "none"                 # none, bf16, fp16
    workers: int = 2                  # DataLoader worker processes
    seed: int = 0
    save_every: int = 10              # also keep checkpoint_epoch_NNNN.pt every N epochs
    preview_every: int = 1            # PNG previews every N epochs
    device: str = "auto"              # auto (cuda when available), cpu or cuda
    resume: bool = False              # continue from the run folder's latest checkpoint
    phantom_cases: int = 8            # volumes of the embedded demonstration phantom
    latest_every_steps: int = 0       # also write checkpoint_latest.pt every N steps
    stop_after_steps: int = 0         # stop (resumably) after N steps in all

    @property
    def demo(self) -> bool:
        return self.data is None

    def resolved(self) -> "PretrainConfig":
        """Fills the defaults that depend on whether this is the demonstration."""
        demo = self.demo
        stunet = self.network == "stunet"     # a ResEnc's default crop is its patch size
        defaults = dict(size="tiny" if demo else "B",
                        crop=None if not stunet else (64, 64, 64) if demo else (112, 112, 128),
                        batch_size=2 if demo else 4, epochs=4 if demo else 1000,
                        warmup_epochs=1 if demo else 20, **data_defaults(self))
        return dataclasses.replace(self, **{k: v for k, v in defaults.items()
                                            if getattr(self, k) is None})


def data_defaults(config: Any) -> dict:
    """Data-pipeline defaults: nnU-Net's for real data, light and quick for the demo
    (its steps per epoch: one pass over its cases, chosen by the job)."""
    demo = config.data is None
    return {"preprocess_workers": 0 if demo else 4, "augmentation": "light" if demo else "nnunet",
            **({} if demo else {"steps_per_epoch": 250})}


@dataclasses.dataclass
class PreprocessConfig:
    """Pre-processes a raw dataset (NIfTI folder, nnU-Net raw dataset, paired images/ and
    labels/) once into a store of chunked, compressed arrays that training reads crops
    from (--data STORE). Resumable; under torchrun each rank takes its share."""

    data: str = ""                    # raw dataset folder
    out: str = ""                     # store folder (manifest.json, cases/)
    workers: int = 4                  # processes (per rank); 0 or 1: in this process
    spacing: tuple[float, float, float] | None = None   # resample to this spacing (mm); default: none
    modality: str = "CT"              # CT, MR or PET (a plain folder; nnU-Net: dataset.json)
    ct_normalization: str = "dataset"  # CT: dataset (nnU-Net: dataset-wide foreground percentiles, mean, std) or volume
    labels: bool = False              # also store label maps (for finetune: give it the same --data and this store as --cache)


DEMO_ENCODER = "runs/pretrain/encoder.pt"    # what the embedded pretraining writes


@dataclasses.dataclass
class FinetuneConfig:
    """STU-Net segmentation fine-tuning, nnU-Net style, from AnatoMask encoder weights
    (--pretrained: encoder.pt or a pretraining checkpoint) or from scratch. With no
    --data, the embedded demonstration (labelled phantom, tiny model, a few minutes on
    a CPU) starting from the embedded pretraining's encoder when it exists."""

    data: str | None = None           # nnU-Net raw dataset (imagesTr, labelsTr, dataset.json) or images/ + labels/ folders
    modality: str = "CT"              # CT, MR or PET (paired folders; nnU-Net: dataset.json)
    ct_normalization: str = "dataset"  # CT: dataset (nnU-Net: dataset-wide foreground percentiles, mean, std) or volume
    cache: str | None = None          # store of --data (default: $ANATOMASK_CACHE/KEY, else OUT/../.store/KEY)
    preprocess_workers: int | None = None  # processes building the store (default 4, demo 0: in this process)
    augmentation: str | None = None   # nnunet, light (mirroring) or none (default nnunet, demo light)
    out: str = "runs/finetune"        # run folder (config, split, checkpoints, logs)
    pretrained: str | None = None     # encoder.pt or checkpoint_latest.pt of pretraining (ResEnc: resenc_*_pretrained.pth, an nnssl checkpoint_final.pth or checkpoint_latest.pt)
    from_scratch: bool = False        # ignore the demo's default pretrained encoder
    size: str | None = None           # tiny, S, B, L, H (default: B, tiny for the demo)
    network: str = "stunet"           # stunet (--size) or resenc-m, resenc-l, resenc-xl: nnU-Net's ResidualEncoderUNet (the preset's, or with --plans the plans' own network)
    plans: str | None = None          # nnUNetPlans.json (ResEnc: nnUNetResEncUNet{M,L,XL}Plans.json): patch size, spacing, strides, normalization
    configuration: str = "3d_fullres"  # the plans' configuration
    plans_kernels: bool = False       # the plans' kernel sizes (STU-Net's trainers: 3x3x3)
    crop: tuple[int, int, int] | None = None   # default 112 112 128 (demo: 32 32 32; --plans: its patch size)
    spacing: tuple[float, float, float] | None = None   # resample to this spacing (mm); default: none (demo: 3 3 4; --plans: its spacing)
    batch_size: int = 2               # per process
    epochs: int | None = None         # default 1000 (demo 80)
    steps_per_epoch: int | None = None  # full batches per epoch (default 250 as nnU-Net; demo: cases // batch)
    val_fraction: float = 0.2         # cases held out for validation (split saved)
    val_every: int | None = None      # validate every N epochs (default 1, demo: only after the last)
    foreground: float | None = None   # share of crops centred on a labelled voxel (default 0.33, demo 0.5)
    lr: float | None = None           # AdamW peak learning rate (default 1e-4, demo 1e-3)
    min_lr: float = 0.0               # end of the cosine decay
    weight_decay: float = 1e-5
    clip_grad: float = 12.0           # gradient-norm clipping
    fused: bool = True                # fused norm+activation, no stored concatenations
    checkpointing: bool | None = None  # recompute encoder stages / decoder levels in backward (default on, demo off: tiny 32^3 needs no memory saving)
    recompute_levels: int = 0         # with --checkpointing: only the N highest resolutions (0: all)
    amp: str = "none"                 # none, bf16, fp16
    sw_overlap: float = 0.5           # sliding-window overlap in validation
    workers: int = 2                  # DataLoader worker processes
    seed: int = 0
    device: str = "auto"              # auto (cuda when available), cpu or cuda
    resume: bool = False              # continue from the run folder's latest checkpoint
    phantom_cases: int = 8            # volumes of the embedded demonstration phantom
    latest_every_steps: int = 0       # also write checkpoint_latest.pt every N steps
    stop_after_steps: int = 0         # stop (resumably) after N steps in all

    @property
    def demo(self) -> bool:
        return self.data is None

    def resolved(self) -> "FinetuneConfig":
        demo = self.demo
        # The demo: the phantom resampled to 3 x 3 x 4 mm (48 x 48 x 40 voxels), 32^3
        # crops, 240 steps, no recomputation (measured together: a step 0.45 s instead of
        # 4 s), validated once at the end (sliding windows cost steps). Mean Dice 0.91 after 240
        # steps from scratch or pretrained (spleen 0.89-0.90); 0.73 / 0.63 after 180
        # (spleen 0.41 / 0.12). At 64^3 and 1.5 mm, 18 steps at 3e-3 collapsed to background.
        epochs = self.epochs or (80 if demo else 1000)
        defaults = dict(size="tiny" if demo else "B",
                        crop=None if self.plans or self.network != "stunet" else
                        (32, 32, 32) if demo else (112, 112, 128),
                        spacing=(3.0, 3.0, 4.0) if demo and not self.plans else None,
                        epochs=epochs, lr=1e-3 if demo else 1e-4,
                        val_every=epochs if demo else 1, foreground=0.5 if demo else 0.33,
                        checkpointing=not demo, **data_defaults(self))
        return dataclasses.replace(self, **{k: v for k, v in defaults.items()
                                            if getattr(self, k) is None})


@dataclasses.dataclass
class PredictConfig:
    """Label maps (NIfTI, with each input's affine and header) for a folder of volumes,
    pre-processed as in training, by sliding-window inference (Gaussian weighting)."""

    checkpoint: str = "runs/finetune/checkpoint_best.pt"   # a fine-tuning checkpoint
    input: str = ""                   # folder of .nii/.nii.gz (a file per case, or nnU-Net CASE_XXXX channels)
    output: str = "predictions"       # folder for the label maps (CASE.nii.gz)
    overlap: float = 0.5              # sliding-window overlap
    mirroring: bool = True            # test-time mirroring over the checkpoint's allowed axes (nnU-Net's default)
    amp: str = "none"                 # none, bf16, fp16
    device: str = "auto"              # auto (cuda when available), cpu or cuda


def _flag_type(hint: Any) -> tuple[Any, int | None]:
    """argparse type and nargs of a field's annotation."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    if typing.get_origin(base) is tuple:
        inner = typing.get_args(base)
        return inner[0], len(inner)
    return base, None


def _field_comments(config_type: type) -> dict[str, str]:
    """The comment after each field in the dataclass's source: the flag's help."""
    pattern = re.compile(r"^\s+(\w+): [^#]*#\s*(.+)$")
    try:
        source = inspect.getsource(config_type)
    except OSError:               # installed without sources: flags without help
        return {}
    found = (pattern.match(line) for line in source.splitlines())
    return {m.group(1): m.group(2).strip() for m in found if m}


def add_arguments(parser: argparse.ArgumentParser, config_type: type) -> None:
    hints = typing.get_type_hints(config_type)
    comments = _field_comments(config_type)
    for field in dataclasses.fields(config_type):
        flag = "--" + field.name.replace("_", "-")
        kind, nargs = _flag_type(hints[field.name])
        help_text = comments.get(field.name, "").replace("%", "%%")   # argparse's % format
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default,
                                help=help_text)
            continue
        if field.default is not None:     # None: the comment says what is chosen
            help_text += (" " if help_text else "") + "(default: %(default)s)"
        parser.add_argument(flag, type=kind, nargs=nargs, default=field.default, help=help_text)


def from_arguments(namespace: argparse.Namespace, config_type: type):
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(config_type)}
    for name, value in values.items():
        if isinstance(value, list):
            values[name] = tuple(value)
    return config_type(**values)


def save(config: Any, path: Path) -> None:
    from .checkpoint import atomic_write_text

    atomic_write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n", path)

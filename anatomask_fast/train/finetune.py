"""``python -m anatomask_fast.train finetune``: STU-Net segmentation fine-tuning from
AnatoMask encoder weights, nnU-Net style: Dice + CE on every
deep-supervision output (the fused loss), AdamW with a cosine learning rate, patches
with foreground oversampling and flips, sliding-window validation (Gaussian weighting)
with per-class Dice, best and latest checkpoints, exact resume (data seeded from
(seed, rank, epoch, step, sample), as in pretraining).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from .. import deep_supervision_loss
from ..models.networks import NetworkSpec, network_spec, segmentation_network
from ..models.plans import PlansGeometry, load_geometry, stunet_plans
from ..models.resenc_export import load_pretrained, minimal_plans
from ..models.segmentation import STUNet, load_encoder
from ..models.stunet import size_spec
from . import checkpoint as ckpt
from .config import DEMO_ENCODER, FinetuneConfig
from .data import DataError, Dataset, job_dataset
from .inference import SEGMENTATION_FORMAT, class_names, infer, overlay, window_count
from .inputs import job_volumes
from .loop import StepLog, Trainer, TrainState, train
from .optim import param_groups, warmup_cosine
from .progress import progress_bar
from .runtime import Runtime
from .sampling import BatchOrder, RandomCrops
from .step import autocast, optimizer_step
from .volumes import Volumes

# STU-Net's nnU-Net v2 trainers that build the same network for each size.
TRAINER_NAMES = {
    "S": "STUNetTrainer_small",
    "B": "STUNetTrainer_base",
    "L": "STUNetTrainer_large",
    "H": "STUNetTrainer_huge",
}


def num_classes(dataset: Dataset, source: str) -> int:
    """Classes of ``dataset.json``'s ``labels`` (name -> value, 0 = background)."""
    if not dataset.labels:
        raise DataError(f"{source}: dataset.json must list the classes under 'labels'")
    values = sorted(int(v) for v in dataset.labels.values())
    if values != list(range(len(values))):
        raise DataError(f"{source}: dataset.json 'labels' must be the values 0..K-1, got {values}")
    return len(values)


def check_cases(dataset: Dataset, classes: int) -> None:
    """Every label map matches its images' shape and affine and holds only the classes
    of dataset.json; raises a DataError naming the case and file."""
    for case in dataset.cases:
        label = nib.load(case.label)
        for image_path in case.images:
            image = nib.load(image_path)
            if image.shape[:3] != label.shape[:3]:
                raise DataError(
                    f"case {case.name!r}: image {image_path} has shape "
                    f"{image.shape} but label {case.label} has {label.shape}"
                )
            if not np.allclose(image.affine, label.affine, atol=1e-4):
                raise DataError(
                    f"case {case.name!r}: image {image_path} and label "
                    f"{case.label} have different affines"
                )
        try:
            values = np.unique(np.asanyarray(label.dataobj))
        except Exception as error:  # nibabel / gzip raise several types for a bad file
            raise DataError(
                f"case {case.name!r}: label {case.label} cannot be read as NIfTI ({error})"
            ) from None
        bad = [v for v in values.tolist() if v != int(v) or not 0 <= v < classes]
        if bad:
            raise DataError(
                f"case {case.name!r}: label {case.label} holds values {bad[:8]} "
                f"outside the {classes} classes of dataset.json (0..{classes - 1})"
            )


def split(dataset: Dataset, fraction: float, seed: int, path: Path) -> dict[str, list[str]]:
    """The train/validation split: read from ``path`` when it exists (a resumed or
    repeated run keeps it), otherwise a seeded shuffle, written there."""
    names = [case.name for case in dataset.cases]
    if path.exists():
        saved = json.loads(path.read_text())
        unknown = sorted(set(saved["train"] + saved["val"]) - set(names))
        if unknown:
            raise DataError(f"{path} names cases the dataset lacks: {unknown[:5]}")
        return saved
    if len(names) < 2:
        raise DataError(
            f"{dataset.description}: at least 2 cases are needed (training and validation)"
        )
    order = np.random.default_rng(seed).permutation(len(names)).tolist()
    n_val = min(len(names) - 1, max(1, round(fraction * len(names))))
    chosen = {
        "train": sorted(names[i] for i in order[n_val:]),
        "val": sorted(names[i] for i in order[:n_val]),
    }
    ckpt.atomic_write_text(json.dumps(chosen, indent=2) + "\n", path)
    return chosen


def _subset(dataset: Dataset, names: list[str]) -> Dataset:
    keep = set(names)
    return dataclasses.replace(dataset, cases=tuple(c for c in dataset.cases if c.name in keep))


def dice_per_class(prediction: torch.Tensor, label: torch.Tensor, classes: int) -> list[float]:
    """Dice of classes 1..K-1 (NaN where a class is in neither map)."""
    scores = []
    for c in range(1, classes):
        p, g = prediction == c, label == c
        total = int(p.sum() + g.sum())
        scores.append(2 * int((p & g).sum()) / total if total else math.nan)
    return scores


def _pretrained(config: FinetuneConfig) -> tuple[str | None, str]:
    """The encoder weights to start from, and a sentence saying so."""
    if config.from_scratch:
        return None, "from scratch (--from-scratch)"
    if config.pretrained:
        return config.pretrained, f"encoder from {config.pretrained}"
    if config.demo and Path(DEMO_ENCODER).is_file():
        return DEMO_ENCODER, f"encoder from {DEMO_ENCODER} (the embedded pretraining's output)"
    hint = (
        (
            f" ({DEMO_ENCODER} not found: run `python -m anatomask_fast.train pretrain` "
            "first to start from it)"
        )
        if config.demo
        else ""
    )
    return None, "from scratch" + hint


def signature(
    config: FinetuneConfig,
    in_channels: int,
    classes: int,
    network: STUNet | None = None,
    spec: NetworkSpec | None = None,
) -> dict:
    meta = {
        "format": SEGMENTATION_FORMAT,
        "size": config.size,
        "in_channels": in_channels,
        "num_classes": classes,
        **(spec.signature() if spec is not None else {}),
    }
    if isinstance(network, STUNet):
        meta.update(
            strides=[list(s) for s in network.strides], kernels=[list(k) for k in network.kernels]
        )
    return meta


def with_plans(config: FinetuneConfig) -> tuple[FinetuneConfig, PlansGeometry | None]:
    """``config`` with the crop (patch size) and spacing of ``--plans`` where not given,
    and the plans' network geometry."""
    if not config.plans:
        return config, None
    plans = load_geometry(config.plans, config.configuration, plans_kernels=config.plans_kernels)
    return dataclasses.replace(
        config, crop=config.crop or plans.patch_size, spacing=config.spacing or plans.spacing
    ), plans


def build_network(
    config: FinetuneConfig,
    in_channels: int,
    classes: int,
    plans: PlansGeometry | None,
    spec: NetworkSpec | None = None,
):
    """STU-Net of ``config.size``, strides and kernels from the plans (else STU-Net's
    isotropic defaults), with the memory options; or ``spec``'s ResidualEncoderUNet."""
    if spec is not None and not spec.is_stunet:
        return segmentation_network(spec, in_channels, classes)
    checkpointing = config.checkpointing and (config.recompute_levels or True)
    return STUNet(
        config.size,
        in_channels,
        classes,
        strides=plans.strides if plans else None,
        kernels=plans.kernels if plans else None,
        fused=config.fused,
        checkpointing=checkpointing,
    )


def run_plans(config: FinetuneConfig, model, volumes: Volumes, modality: str) -> dict:
    """The plans the checkpoints carry: the ``--plans`` file's content, else plans of
    this run (its patch, spacing, strides, kernels, normalization, the store's median
    shape and CT statistics) that STU-Net's and nnU-Net's trainers both read (a
    ResidualEncoderUNet: its architecture, patch, spacing and normalization). Per-volume
    CT normalization has no nnU-Net scheme: it is written as z-score (without the
    clipping)."""
    if config.plans:
        return json.loads(Path(config.plans).read_text())
    if not isinstance(model, STUNet):
        return minimal_plans(
            model.arch,
            model.in_channels,
            config.crop,
            config.spacing,
            modality,
            config.configuration,
        )
    norm = volumes.normalization
    dataset_ct = norm.get("scheme") == "dataset" and bool(norm.get("channels"))
    shapes = np.array([volumes.shape(i) for i in range(len(volumes))])
    spec = size_spec(config.size)
    return stunet_plans(
        size=config.size,
        dims=spec.dims,
        depth=spec.depth,
        strides=model.strides,
        kernels=model.kernels,
        patch_size=config.crop,
        spacing=config.spacing,
        schemes=["CTNormalization" if dataset_ct else "ZScoreNormalization"] * model.in_channels,
        intensity=norm["channels"] if dataset_ct else None,
        median_shape=np.median(shapes, axis=0).round().astype(int).tolist(),
        batch_size=config.batch_size,
        configuration=config.configuration,
    )


def nnunet_fields(
    config: FinetuneConfig,
    model,
    dataset: Dataset,
    epoch: int,
    preprocessing_info: dict,
    plans: dict,
) -> dict:
    """What nnU-Net v2's checkpoints carry for inference (``init_args`` with the plans,
    configuration and dataset.json, ``trainer_name``,
    ``inference_allowed_mirroring_axes``, ``current_epoch``); plain JSON-like values."""
    dataset_json = {
        "channel_names": {str(i): dataset.modality for i in range(model.in_channels)},
        "labels": preprocessing_info["labels"],
        "file_ending": ".nii.gz",
    }
    return {
        "init_args": {
            "plans": plans,
            "configuration": config.configuration,
            "fold": 0,
            "dataset_json": dataset_json,
        },
        "trainer_name": "nnUNetTrainer"
        if not isinstance(model, STUNet)
        else TRAINER_NAMES.get(config.size, f"anatomask_fast_STUNet_{config.size}"),
        "inference_allowed_mirroring_axes": [0, 1, 2],
        "current_epoch": epoch,
    }


@dataclasses.dataclass
class FinetuneState(TrainState):
    best_dice: float = -1.0


class Finetuning(Trainer):
    """STU-Net fine-tuning in the one loop (``loop.run_training``): Dice + CE on the
    deep-supervision outputs, AdamW with a per-step cosine learning rate; sliding-window
    validation, the best checkpoint and the overlays at the epochs' ends."""

    job = "finetune"
    # nnU-Net's Dice + CE adds the negative soft Dice: -1 is a perfect prediction.
    loss_label = "loss (CE - Dice)"

    def __init__(self, config: FinetuneConfig, runtime: Runtime, out: Path) -> None:
        super().__init__(config, runtime, out)
        torch.manual_seed(config.seed)
        spec = network_spec(config.network, config.size, config.plans, config.configuration)
        config, plans = with_plans(config)
        if config.crop is None:  # a ResEnc preset's: its patch size
            config = dataclasses.replace(config, crop=spec.patch_size)
        self.config = config
        dataset = job_dataset(
            config.data,
            out,
            runtime,
            modality=config.modality,
            phantom_cases=config.phantom_cases,
            seed=config.seed,
            with_labels=True,
        )
        if plans is not None:  # nnU-Net's normalization scheme picks the pre-processing
            dataset = dataclasses.replace(dataset, modality=plans.modality)
        self.dataset = dataset
        self.classes = num_classes(dataset, dataset.description)
        self.class_names = class_names(dataset.labels, self.classes)
        self.shown_dice = {"val Dice": "not yet"}  # the last validation's, on the bar
        check_cases(dataset, self.classes)
        in_channels = len(dataset.cases[0].images)
        chosen = split(dataset, config.val_fraction, config.seed, out / "splits.json")
        train_set, self.val_set = _subset(dataset, chosen["train"]), _subset(dataset, chosen["val"])
        pretrained, self.origin = _pretrained(config)
        self.say(
            f"anatomask_fast finetune: data = {dataset.description}"
            + (" (embedded demonstration: labelled phantom)" if config.demo else "")
        )
        self.say(
            f"  model {spec.describe()}, {self.classes} classes, {self.origin}; crop "
            f"{config.crop}, batch {config.batch_size} x {runtime.world_size} process(es), "
            f"{config.epochs} epochs, {len(train_set.cases)} training / "
            f"{len(self.val_set.cases)} validation cases, device {runtime.device}"
        )
        self.say(
            "  the bar's loss (CE - Dice) is nnU-Net's Dice + CE loss: cross-entropy plus "
            "the negative soft Dice, so it falls below 0 as the Dice grows (-1 would be "
            "perfect); val Dice is the last validation's mean over the foreground classes"
        )
        if plans is not None:
            self.say(
                f"  from {config.plans} ({plans.configuration}): patch {plans.patch_size}, "
                f"spacing {plans.spacing}, strides {list(plans.strides)}, {plans.modality} "
                "normalization"
            )
        self.model = build_network(config, in_channels, self.classes, plans, spec)
        if pretrained is not None and not config.resume:
            (load_encoder if spec.is_stunet else load_pretrained)(
                self.model, pretrained, verbose=runtime.main
            )
        self.model.to(runtime.device)
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, config.weight_decay), lr=config.lr
        )
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=config.amp == "fp16")
        self.signature = signature(config, in_channels, self.classes, self.model, spec)
        self.state = FinetuneState()
        volumes = job_volumes(config, out, runtime, with_labels=True)
        self.data = RandomCrops(
            volumes.subset(chosen["train"]),
            config.crop,
            seed=config.seed,
            rank=runtime.rank,
            batch_size=config.batch_size,
            augmentation=config.augmentation,
            labels=True,
            foreground=config.foreground,
        )
        self.validation = volumes.subset(chosen["val"])
        self.steps_per_epoch = config.steps_per_epoch or max(
            1, len(self.data) // (config.batch_size * runtime.world_size)
        )  # demo: a pass over the cases
        self.sampler = BatchOrder(self.steps_per_epoch, config.batch_size)
        self.network = DistributedDataParallel(self.model) if runtime.distributed else self.model
        self.preprocessing_info = {
            "modality": dataset.modality,
            "spacing": config.spacing,
            "crop": config.crop,
            "labels": dataset.labels,
            "normalization": volumes.normalization,
        }
        self.plans = run_plans(config, self.model, volumes, dataset.modality)

    def on_epoch_start(self) -> None:
        self.model.train()

    def train_step(self, batch: dict) -> StepLog:
        config, state = self.config, self.state
        x = batch["image"].to(self.runtime.device, non_blocking=True)
        y = batch["label"].to(self.runtime.device, non_blocking=True)
        lr = warmup_cosine(
            state.epoch + state.step_in_epoch / self.steps_per_epoch,
            base_lr=config.lr,
            min_lr=config.min_lr,
            warmup_epochs=0,
            total_epochs=config.epochs,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with autocast(self.runtime.device, config.amp):
            outputs = self.network(x)
        loss = deep_supervision_loss([o.float() for o in outputs], y)
        optimizer_step(loss, self.optimizer, self.scaler, self.model.parameters(), config.clip_grad)
        return StepLog(loss, x.shape[0], {"lr": lr}, self.shown_dice)

    def on_epoch_end(self) -> None:
        config, state = self.config, self.state
        if not self.runtime.main or (
            state.epoch % config.val_every and state.epoch != config.epochs
        ):
            return
        scores = _validate(self)
        mean = float(np.nanmean(scores)) if not all(map(math.isnan, scores)) else 0.0
        self.log({"epoch": state.epoch - 1, "val_dice": mean, "val_dice_per_class": scores})
        self.say(
            f"  epoch {state.epoch} of {config.epochs}: validation Dice {mean:.4f} (mean "
            f"over the {len(scores)} foreground classes of {len(self.val_set.cases)} "
            "case(s)): "
            + ", ".join(f"{name} {score:.3f}" for name, score in zip(self.class_names[1:], scores))
        )
        self.shown_dice = {"val Dice": f"{mean:.3f}"}
        if mean > state.best_dice:
            state.best_dice = mean
            ckpt.atomic_save(
                {**self.checkpoint(full=False), "state": dataclasses.asdict(state)},
                self.out / "checkpoint_best.pt",
            )

    def on_train_end(self) -> None:
        out = self.out
        self.say(
            f"  done: best validation Dice {self.state.best_dice:.4f} ({self.origin}); "
            f"outputs in {out}/: checkpoint_best.pt, checkpoint_latest.pt, overlays/, "
            "splits.json, metrics.jsonl"
        )
        self.say(
            f"  next: label new volumes: python -m anatomask_fast.train predict --checkpoint "
            f"{out / 'checkpoint_best.pt'} --input VOLUMES (files or folders) --output "
            "predictions"
        )
        if self.config.demo:  # the other start, for the comparison the README gives measured
            other = (
                "after `python -m anatomask_fast.train` (pretraining)"
                if self.origin.startswith("from scratch")
                else "with --from-scratch"
            )
            self.say(
                f"  compare: run it {other} into another --out; README, Fine-tuning, gives both"
            )

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"model": self.model}

    def checkpoint(self, full: bool = True) -> dict:
        """The weights under STU-Net's names (``network_weights``, the same tensors as
        ``model``), what nnU-Net's inference reads, and with ``full`` what resuming
        needs."""
        saved = (
            super().checkpoint() if full else {**self.signature, "model": self.model.state_dict()}
        )
        return {
            **saved,
            **self.preprocessing_info,
            "network_weights": saved["model"],
            **nnunet_fields(
                self.config,
                self.model,
                self.dataset,
                self.state.epoch,
                self.preprocessing_info,
                self.plans,
            ),
        }


def run(config: FinetuneConfig) -> Path:
    return train(Finetuning, config)


def _validate(trainer: Finetuning) -> list[float]:
    """Mean over the validation cases of the per-class Dice of sliding-window
    predictions, with a progress bar over the windows; an overlay PNG of the first
    case."""
    config, validation, names = trainer.config, trainer.validation, trainer.class_names
    shapes = [validation.shape(index) for index in range(len(validation))]
    total = sum(window_count(shape, config.crop, config.sw_overlap) for shape in shapes)
    per_case = []
    with progress_bar(
        total, f"validation of epoch {trainer.state.epoch}", "window", leave=False
    ) as bar:
        for index in range(len(validation)):
            volume, label = (torch.from_numpy(a) for a in validation.whole(index, label=True))
            image, label = volume[None].to(trainer.runtime.device), label[0]
            prediction = (
                infer(
                    trainer.model,
                    image,
                    config.crop,
                    overlap=config.sw_overlap,
                    amp=config.amp,
                    progress=bar,
                )
                .argmax(1)[0]
                .cpu()
            )
            per_case.append(dice_per_class(prediction, label, trainer.classes))
            if index == 0:
                case = trainer.val_set.cases[0].name
                dice = ", ".join(f"{n} {d:.2f}" for n, d in zip(names[1:], per_case[0]))
                overlay(
                    trainer.out / "overlays" / f"epoch_{trainer.state.epoch:04d}_{case}.png",
                    volume[0],
                    label,
                    prediction,
                    names=names,
                    title=f"validation case {case}, epoch {trainer.state.epoch} of "
                    f"{config.epochs}: Dice {dice}",
                )
    trainer.model.train()
    table = np.array(per_case, dtype=np.float64)
    return [float(np.nanmean(col)) if not np.isnan(col).all() else math.nan for col in table.T]

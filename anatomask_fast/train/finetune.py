"""``python -m anatomask_fast.train finetune``: STU-Net segmentation fine-tuning from
AnatoMask encoder weights, nnU-Net style (SPEC section 6): Dice + CE on every
deep-supervision output (the fused loss), AdamW with a cosine learning rate, patches
with foreground oversampling and flips, sliding-window validation (Gaussian weighting)
with per-class Dice, best and latest checkpoints, exact resume (data seeded from
(seed, rank, epoch, step, sample), as in pretraining).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from .. import deep_supervision_loss
from ..models.plans import PlansGeometry, load_geometry
from ..models.segmentation import STUNet, load_encoder
from . import checkpoint as ckpt
from .inference import SEGMENTATION_FORMAT, infer, overlay
from .config import DEMO_ENCODER, FinetuneConfig, save as save_config
from .data import DataError, Dataset, job_dataset
from .inputs import job_volumes
from .sampling import BatchOrder, RandomCrops, epoch_loader
from .volumes import Volumes
from .optim import param_groups, warmup_cosine
from .runtime import (MetricsLog, Runtime, autocast, checked_loss, finish_step,
                      optimizer_step, progress_bar, run_job, seed_step)

# STU-Net's nnU-Net v2 trainers that build the same network for each size.
TRAINER_NAMES = {"S": "STUNetTrainer_small", "B": "STUNetTrainer_base",
                 "L": "STUNetTrainer_large", "H": "STUNetTrainer_huge"}


@dataclasses.dataclass
class TrainState:
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_dice: float = -1.0


def num_classes(dataset: Dataset, source: str) -> int:
    """Classes of ``dataset.json``'s ``labels`` (name -> value, 0 = background)."""
    if not dataset.labels:
        raise DataError(f"{source}: dataset.json must list the classes under 'labels'")
    values = sorted(int(v) for v in dataset.labels.values())
    if values != list(range(len(values))):
        raise DataError(f"{source}: dataset.json 'labels' must be the values 0..K-1, got "
                        f"{values}")
    return len(values)


def check_cases(dataset: Dataset, classes: int) -> None:
    """Every label map matches its images' shape and affine and holds only the classes
    of dataset.json; raises a DataError naming the case and file."""
    for case in dataset.cases:
        label = nib.load(case.label)
        for image_path in case.images:
            image = nib.load(image_path)
            if image.shape[:3] != label.shape[:3]:
                raise DataError(f"case {case.name!r}: image {image_path} has shape "
                                f"{image.shape} but label {case.label} has {label.shape}")
            if not np.allclose(image.affine, label.affine, atol=1e-4):
                raise DataError(f"case {case.name!r}: image {image_path} and label "
                                f"{case.label} have different affines")
        try:
            values = np.unique(np.asanyarray(label.dataobj))
        except Exception as error:  # nibabel / gzip raise several types for a bad file
            raise DataError(f"case {case.name!r}: label {case.label} cannot be read as NIfTI "
                            f"({error})") from None
        bad = [v for v in values.tolist() if v != int(v) or not 0 <= v < classes]
        if bad:
            raise DataError(f"case {case.name!r}: label {case.label} holds values {bad[:8]} "
                            f"outside the {classes} classes of dataset.json (0..{classes - 1})")


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
        raise DataError(f"{dataset.description}: at least 2 cases are needed "
                        "(training and validation)")
    order = np.random.default_rng(seed).permutation(len(names)).tolist()
    n_val = min(len(names) - 1, max(1, round(fraction * len(names))))
    chosen = {"train": sorted(names[i] for i in order[n_val:]),
              "val": sorted(names[i] for i in order[:n_val])}
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
    hint = (f" ({DEMO_ENCODER} not found: run `python -m anatomask_fast.train pretrain` "
            "first to start from it)") if config.demo else ""
    return None, "from scratch" + hint


def signature(config: FinetuneConfig, in_channels: int, classes: int,
              network: STUNet | None = None) -> dict:
    meta = {"format": SEGMENTATION_FORMAT, "size": config.size, "in_channels": in_channels,
            "num_classes": classes}
    if network is not None:
        meta.update(strides=[list(s) for s in network.strides],
                    kernels=[list(k) for k in network.kernels])
    return meta


def with_plans(config: FinetuneConfig) -> tuple[FinetuneConfig, PlansGeometry | None]:
    """``config`` with the crop (patch size) and spacing of ``--plans`` where not given,
    and the plans' network geometry."""
    if not config.plans:
        return config, None
    plans = load_geometry(config.plans, config.configuration, plans_kernels=config.plans_kernels)
    return dataclasses.replace(config, crop=config.crop or plans.patch_size,
                               spacing=config.spacing or plans.spacing), plans


def build_network(config: FinetuneConfig, in_channels: int, classes: int,
                  plans: PlansGeometry | None) -> STUNet:
    """STU-Net of ``config.size``, strides and kernels from the plans (else STU-Net's
    isotropic defaults), with the memory options."""
    checkpointing = config.checkpointing and (config.recompute_levels or True)
    return STUNet(config.size, in_channels, classes,
                  strides=plans.strides if plans else None,
                  kernels=plans.kernels if plans else None,
                  fused=config.fused, checkpointing=checkpointing)


def nnunet_fields(config: FinetuneConfig, model: STUNet, dataset: Dataset, epoch: int,
                  preprocessing_info: dict) -> dict:
    """What nnU-Net v2's checkpoints carry for inference (``init_args`` with the plans,
    configuration and dataset.json, ``trainer_name``,
    ``inference_allowed_mirroring_axes``, ``current_epoch``); plain JSON-like values."""
    if config.plans:
        plans = json.loads(Path(config.plans).read_text())
    else:       # a minimal plans dict describing this run's network and pre-processing
        plans = {"plans_name": "anatomask_fast", "configurations": {config.configuration: {
            "patch_size": list(config.crop),
            "spacing": list(config.spacing) if config.spacing else None,
            "normalization_schemes": ["CTNormalization" if dataset.modality == "CT"
                                      else "ZScoreNormalization"] * model.in_channels,
            "architecture": {"network_class_name": "STUNet", "arch_kwargs": {
                "strides": [[1, 1, 1]] + [list(s) for s in model.strides],
                "kernel_sizes": [list(k) for k in model.kernels], "n_stages": 6}}}}}
    dataset_json = {"channel_names": {str(i): dataset.modality for i in range(model.in_channels)},
                    "labels": preprocessing_info["labels"], "file_ending": ".nii.gz"}
    return {"init_args": {"plans": plans, "configuration": config.configuration, "fold": 0,
                          "dataset_json": dataset_json},
            "trainer_name": TRAINER_NAMES.get(config.size, f"anatomask_fast_STUNet_{config.size}"),
            "inference_allowed_mirroring_axes": [0, 1, 2], "current_epoch": epoch}


def run(config: FinetuneConfig) -> Path:
    if config.foreground is not None and not 0.0 <= config.foreground <= 1.0:
        raise ValueError(f"--foreground must be in [0, 1], got {config.foreground}")
    return run_job(config, _train)


def _train(config: FinetuneConfig, runtime: Runtime, out: Path) -> Path:
    torch.manual_seed(config.seed)
    config, plans = with_plans(config)
    dataset = job_dataset(config.data, out, runtime, modality=config.modality,
                          phantom_cases=config.phantom_cases, seed=config.seed, with_labels=True)
    if plans is not None:       # nnU-Net's normalization scheme picks the pre-processing
        dataset = dataclasses.replace(dataset, modality=plans.modality)
    classes = num_classes(dataset, dataset.description)
    check_cases(dataset, classes)
    in_channels = len(dataset.cases[0].images)
    say = print if runtime.main else (lambda *a, **k: None)
    chosen = split(dataset, config.val_fraction, config.seed, out / "splits.json")
    train_set, val_set = _subset(dataset, chosen["train"]), _subset(dataset, chosen["val"])
    pretrained, origin = _pretrained(config)
    say(f"anatomask_fast finetune: data = {dataset.description}"
        + (" (embedded demonstration: labelled phantom)" if config.demo else ""))
    say(f"  model STU-Net-{config.size}, {classes} classes, {origin}; crop {config.crop}, "
        f"batch {config.batch_size} x {runtime.world_size} process(es), {config.epochs} "
        f"epochs, {len(train_set.cases)} training / {len(val_set.cases)} validation cases, "
        f"device {runtime.device}")
    if plans is not None:
        say(f"  from {config.plans} ({plans.configuration}): patch {plans.patch_size}, spacing "
            f"{plans.spacing}, strides {list(plans.strides)}, {plans.modality} normalization")

    model = build_network(config, in_channels, classes, plans)
    state = TrainState()
    latest = out / "checkpoint_latest.pt"
    if pretrained is not None and not config.resume:
        load_encoder(model, pretrained, verbose=runtime.main)
    model.to(runtime.device)
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=config.amp == "fp16")
    meta = signature(config, in_channels, classes, model)
    if config.resume:
        saved = ckpt.load(latest)
        ckpt.check_compatible(saved, meta, latest)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        state = TrainState(**saved["state"])
        say(f"  resumed from {latest} at epoch {state.epoch}, step {state.global_step}")
    if runtime.main:
        save_config(config, out / "config.json")

    volumes = job_volumes(config, out, runtime, with_labels=True)
    data = RandomCrops(volumes.subset(chosen["train"]), config.crop, seed=config.seed,
                       rank=runtime.rank, batch_size=config.batch_size,
                       augmentation=config.augmentation, labels=True,
                       foreground=config.foreground)
    validation = volumes.subset(chosen["val"])
    steps_per_epoch = config.steps_per_epoch or max(
        1, len(data) // (config.batch_size * runtime.world_size))   # demo: a pass over the cases
    sampler = BatchOrder(steps_per_epoch, config.batch_size)
    network = DistributedDataParallel(model) if runtime.distributed else model
    metrics = MetricsLog(out, runtime.main)
    preprocessing_info = {"modality": dataset.modality, "spacing": config.spacing,
                          "crop": config.crop, "labels": dataset.labels,
                          "normalization": volumes.normalization}

    def save(path: Path, full: bool = True) -> None:
        if runtime.main:
            extra = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                     "config": dataclasses.asdict(config)} if full else {}
            weights = model.state_dict()     # STU-Net's names; one copy under both keys
            ckpt.atomic_save({**meta, **preprocessing_info, "model": weights,
                              "network_weights": weights, "state": dataclasses.asdict(state),
                              **nnunet_fields(config, model, dataset, state.epoch,
                                              preprocessing_info), **extra}, path)

    progress = progress_bar(runtime, config.epochs * steps_per_epoch, state.global_step,
                            "finetune")
    while state.epoch < config.epochs:
        batches = iter(epoch_loader(data, sampler, epoch=state.epoch,
                                    start_step=state.step_in_epoch, workers=config.workers))
        model.train()
        while state.step_in_epoch < steps_per_epoch:
            batch = next(batches)
            x = batch["image"].to(runtime.device, non_blocking=True)
            y = batch["label"].to(runtime.device, non_blocking=True)
            lr = warmup_cosine(state.epoch + state.step_in_epoch / steps_per_epoch,
                               base_lr=config.lr, min_lr=config.min_lr, warmup_epochs=0,
                               total_epochs=config.epochs)
            for group in optimizer.param_groups:
                group["lr"] = lr
            seed_step(config.seed, runtime.rank, state.global_step)
            started = time.perf_counter()
            with autocast(runtime.device, config.amp):
                outputs = network(x)
            loss = deep_supervision_loss([o.float() for o in outputs], y)
            optimizer_step(loss, optimizer, scaler, model.parameters(), config.clip_grad)
            loss_value = checked_loss(loss, state.epoch, state.global_step, latest)
            elapsed = time.perf_counter() - started
            if finish_step(state, config, runtime, metrics, progress, lambda: save(latest),
                           {"loss": loss_value, "lr": lr, "batch_size": x.shape[0],
                            "step_seconds": elapsed,
                            "samples_per_second": x.shape[0] / elapsed},
                           {"loss": f"{loss_value:.4f}"}):
                progress.close()
                say(f"  stopped after {state.global_step} steps (--stop-after-steps): {latest} "
                    "written, continue with --resume")
                return out
        state.epoch += 1
        state.step_in_epoch = 0
        if runtime.main and (state.epoch % config.val_every == 0 or state.epoch == config.epochs):
            scores = _validate(model, validation, val_set, classes, config, runtime, out,
                               state.epoch)
            mean = float(np.nanmean(scores)) if not all(map(math.isnan, scores)) else 0.0
            metrics.write(state.global_step, {"epoch": state.epoch - 1, "val_dice": mean,
                                              "val_dice_per_class": scores})
            progress.write(f"  epoch {state.epoch}: validation Dice {mean:.4f} per class "
                           + " ".join(f"{s:.3f}" for s in scores))
            if mean > state.best_dice:
                state.best_dice = mean
                save(out / "checkpoint_best.pt", full=False)
        save(latest)
    progress.close()
    metrics.close()
    say(f"  done: best validation Dice {state.best_dice:.4f} ({origin}); checkpoints in {out}")
    if config.demo:     # the other start, for the comparison the README gives measured
        other = ("after `python -m anatomask_fast.train` (pretraining)" if pretrained is None
                 else "with --from-scratch")
        say(f"  compare: run it {other} into another --out; README, Fine-tuning, gives both")
    return out


def _validate(model: STUNet, validation: Volumes, val_set: Dataset, classes: int,
              config: FinetuneConfig, runtime: Runtime, out: Path, epoch: int) -> list[float]:
    """Mean over the validation cases of the per-class Dice of sliding-window
    predictions; an overlay PNG of the first case."""
    per_case = []
    for index in range(len(validation)):
        volume, label = (torch.from_numpy(a) for a in validation.whole(index, label=True))
        image, label = volume[None].to(runtime.device), label[0]
        prediction = infer(model, image, config.crop, overlap=config.sw_overlap,
                           amp=config.amp).argmax(1)[0].cpu()
        per_case.append(dice_per_class(prediction, label, classes))
        if index == 0:
            overlay(out / "overlays" / f"epoch_{epoch:04d}_{val_set.cases[0].name}.png",
                    volume[0], label, prediction)
    model.train()
    table = np.array(per_case, dtype=np.float64)
    return [float(np.nanmean(col)) if not np.isnan(col).all() else math.nan for col in table.T]

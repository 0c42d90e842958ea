"""``python -m anatomask_fast.train pretrain``: AnatoMask pretraining.

One step, all on the device, as the published one: a random mask, the EMA teacher's
reconstruction (eval mode) and its per-patch errors (fused loss kernel), the anatomical
mask (one selection launch), the student's reconstruction and loss, AdamW with
clipping, the EMA update; learning rate and EMA decay set once per epoch. Masks are
seeded from (seed, rank, step), and data from (seed, rank, epoch, step, sample), so a
resumed run repeats exactly what an uninterrupted one does.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from .. import anatomical_mask, patch_recon_loss, random_mask
from ..models.anatomask import AnatoMaskNet
from ..models.export import export_pretrained
from ..models.networks import NetworkSpec, export_resenc, network_spec, pretraining_network
from ..ops.mask_select import MaskResult, mask_counts
from ..schedules import MaskingSchedule, masking_schedule
from . import checkpoint as ckpt
from .config import DEMO_ENCODER, PretrainConfig
from .guidance_probe import TrainingGuidance
from .inputs import job_volumes
from .loop import StepLog, Trainer, TrainState, train
from .optim import ema_decay_at_epoch, ema_update, linear_warmup_cosine_annealing, param_groups
from .previews import denormalized, save_preview
from .runtime import Runtime
from .sampling import BatchOrder, RandomCrops
from .step import autocast, optimizer_step
from .teacher import ranking_errors, teacher_reconstruction

FORMAT = "anatomask_fast.pretrain/1"
# How --hard-max parameterizes each schedule kind (see anatomask_fast.schedules).
SCHEDULE_LEVEL = {
    "linear": lambda v: {"max_frac": v},
    "hard_to_easy": lambda v: {"max_frac": v},
    "cosine": lambda v: {"end": v},
    "constant": lambda v: {"value": v},
}


def _seed(*values: int) -> int:
    return int(np.random.SeedSequence(list(values)).generate_state(1, dtype=np.uint64)[0] >> 1)


class StepResult(NamedTuple):
    loss: torch.Tensor  # the student's masked loss on normalized patches
    mask: MaskResult  # the anatomical mask the student saw
    rec: torch.Tensor  # the student's reconstruction, in x's dtype
    teacher_mask: MaskResult  # the teacher pass's random mask (the mask, without one)
    teacher_errors: torch.Tensor | None  # its per-patch errors (B, L), zero at visible patches
    #                                      (all zero while no patch is chosen by them: not run)


def pretrain_step(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    x: torch.Tensor,
    *,
    mask_ratio: float,
    hard_frac: float | None,
    seed: int,
    teacher_target: str = "raw",
    teacher_foreground: bool = False,
    amp: str = "none",
    noise: torch.Tensor | None = None,
) -> StepResult:
    """One published step up to the loss: a random mask, the eval-mode teacher's
    per-patch errors (skipped while ``hard_frac`` chooses no patch: they cannot change
    the mask), the anatomical mask, the student's (training-mode) loss. Runs in
    ``x``'s dtype (float64 for equivalence checks); under ``amp`` the reconstructions
    are cast back to it. ``teacher_target`` and ``teacher_foreground``: the ranking
    rule of the teacher's errors (``train.teacher``; published: raw, no foreground).
    ``noise`` (B, L): the random part of the anatomical mask from these values instead
    of the seeded draw (for comparisons with a reference). ``hard_frac=None``: SparK's
    step, a random mask and no teacher pass."""
    patch = teacher.patch_size
    cells = (patch,) * 3 if isinstance(patch, int) else patch
    shape = (x.shape[0], 1, *(s // p for s, p in zip(x.shape[2:], cells)))
    if hard_frac is None:
        mask = random_mask(shape, mask_ratio, device=x.device, seed=_seed(seed, 1))
        with autocast(x.device, amp):
            rec = student(x, mask.active).to(x.dtype)
        loss, _ = patch_recon_loss(rec, x, mask.active, patch, norm_pix=True)
        return StepResult(loss, mask, rec, mask, None)
    teacher_mask = random_mask(shape, mask_ratio, device=x.device, seed=_seed(seed, 0))
    if mask_counts(math.prod(shape[2:]), mask_ratio, hard_frac)[1]:
        rec = teacher_reconstruction(teacher, x, teacher_mask.active, amp)
        errors = ranking_errors(
            rec, x, teacher_mask.active, patch, target=teacher_target, foreground=teacher_foreground
        )
    else:
        # No patch is chosen by its error (the start of the easy-to-hard schedule): the
        # mask is uniform, whatever the errors; the teacher's pass would change nothing.
        errors = torch.zeros(
            shape[0],
            math.prod(shape[2:]),
            device=x.device,
            dtype=torch.promote_types(x.dtype, torch.float32),
        )
    with torch.no_grad():
        mask = anatomical_mask(
            errors.view(shape),
            mask_ratio,
            hard_frac,
            noise=noise,
            seed=None if noise is not None else _seed(seed, 1),
        )
    with autocast(x.device, amp):
        rec = student(x, mask.active).to(x.dtype)
    loss, _ = patch_recon_loss(rec, x, mask.active, patch, norm_pix=True)
    return StepResult(loss, mask, rec, teacher_mask, errors)


def published_hard_frac(
    schedule: MaskingSchedule | None, config: PretrainConfig, epoch: int, step: int
) -> float | None:
    """hard_frac of the schedule; capped at --hard-max unless reference-compatible;
    None without a schedule (--hard-schedule none)."""
    if schedule is None:
        return None
    value = schedule(epoch, step)
    return value if config.reference_compatible else min(value, config.hard_max)


def build_optimizer(student: torch.nn.Module, config: PretrainConfig) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.999); weight decay on every parameter as published, or not on
    biases, norms and mask tokens with --decay-exempt. The learning rate is set per
    epoch (:func:`epoch_lr`)."""
    params = (
        param_groups(student, config.weight_decay)
        if config.decay_exempt
        else [p for p in student.parameters() if p.requires_grad]
    )
    # fused: the same update (float64: equal to 1e-16) in one kernel per parameter; on
    # CPU 6x faster than the default per-tensor loop (STU-Net-B).
    return torch.optim.AdamW(
        params,
        lr=epoch_lr(config, 0),
        betas=(0.9, 0.999),
        weight_decay=config.weight_decay,
        fused=True,
    )


def epoch_lr(config: PretrainConfig, epoch: int) -> float:
    return linear_warmup_cosine_annealing(
        epoch,
        base_lr=config.lr,
        warmup_epochs=config.warmup_epochs,
        max_epochs=config.epochs,
        warmup_start_lr=config.warmup_start_lr,
        eta_min=config.min_lr,
    )


def _model_signature(config: PretrainConfig, in_channels: int, spec: NetworkSpec) -> dict:
    return {
        "format": FORMAT,
        "size": config.size,
        "in_channels": in_channels,
        "per_sample_norm": config.per_sample_norm,
        **spec.signature(),
    }


class Pretraining(Trainer):
    """AnatoMask pretraining in the one loop (``loop.run_training``): the published
    step (:func:`pretrain_step`, AdamW, the EMA update) with the learning rate, EMA
    decay and ``hard_frac`` of the current epoch; previews, exports and epoch
    checkpoints at each epoch's end."""

    job = "pretrain"

    def __init__(self, config: PretrainConfig, runtime: Runtime, out: Path) -> None:
        super().__init__(config, runtime, out)
        torch.manual_seed(config.seed)
        self.spec = network_spec(config.network, config.size, config.plans, config.configuration)
        if config.crop is None:  # a ResEnc's default: its patch size
            config = self.config = dataclasses.replace(config, crop=self.spec.patch_size)
        volumes = job_volumes(config, out, runtime)
        self.in_channels = volumes.channels
        self.steps_per_epoch = config.steps_per_epoch or max(
            1, len(volumes) // (config.batch_size * runtime.world_size)
        )  # demo: a pass over the cases
        self.say(
            f"anatomask_fast pretrain: data = {volumes.description}"
            + (" (embedded demonstration: procedural phantom)" if config.demo else "")
        )
        self.say(
            f"  model {self.spec.describe()}, crop {config.crop}, batch {config.batch_size} x "
            f"{runtime.world_size} process(es), {config.epochs} epochs of "
            f"{self.steps_per_epoch} steps, device {runtime.device}, "
            f"{'reference-compatible' if config.reference_compatible else 'library defaults'}"
        )
        self.student = self.build_network()
        self.teacher = copy.deepcopy(self.student).requires_grad_(False).eval()  # timm ModelEma
        self.optimizer = build_optimizer(self.student, config)
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=config.amp == "fp16")
        self.data = RandomCrops(
            volumes,
            config.crop,
            seed=config.seed,
            rank=runtime.rank,
            batch_size=config.batch_size,
            augmentation=config.augmentation,
        )
        self.sampler = BatchOrder(self.steps_per_epoch, config.batch_size)
        self.schedule = (
            None
            if config.hard_schedule == "none"
            else masking_schedule(
                config.hard_schedule,
                total_epochs=config.epochs,
                steps_per_epoch=self.steps_per_epoch if config.schedule_by == "step" else None,
                **SCHEDULE_LEVEL.get(config.hard_schedule, lambda v: {})(config.hard_max),
            )
        )
        self.state = TrainState()
        self.signature = _model_signature(config, self.in_channels, self.spec)
        self.model = DistributedDataParallel(self.student) if runtime.distributed else self.student
        # The epoch's last batch, mask, reconstruction and hard share: the preview.
        self.last: tuple[torch.Tensor, MaskResult, torch.Tensor, float] | None = None
        self.normalization = volumes.normalization
        self.modality = volumes.normalization.get("modality", config.modality)
        # --guidance-data: the teacher's guidance measured on labelled volumes (main only).
        self.guidance = (
            TrainingGuidance(config, volumes.normalization, out, self.steps_per_epoch)
            if config.guidance_data and runtime.main
            else None
        )

    def build_network(self) -> AnatoMaskNet:
        student = pretraining_network(
            self.spec,
            self.in_channels,
            per_sample_norm=self.config.per_sample_norm,
            # torch's SyncBatchNorm runs on CUDA only; on CPU (gloo)
            # each process keeps its own decoder BatchNorm statistics.
            sync_bn=self.runtime.distributed and self.runtime.device.type == "cuda",
        ).to(self.runtime.device)
        for unused in student.unused_in_lean_mode():
            unused.requires_grad_(False)  # the full-resolution densify the decoder never reads
        return student

    def train_step(self, batch: dict) -> StepLog:
        config, state = self.config, self.state
        x = batch["image"].to(self.runtime.device, non_blocking=True)
        # Learning rate and EMA decay are set once per epoch, as published.
        lr = epoch_lr(config, state.epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        decay = ema_decay_at_epoch(state.epoch, config.epochs, config.ema_start, config.ema_end)
        hard_frac = published_hard_frac(self.schedule, config, state.epoch, state.step_in_epoch)
        loss, mask, rec, _, _ = pretrain_step(
            self.model,
            self.teacher,
            x,
            mask_ratio=config.mask_ratio,
            hard_frac=hard_frac,
            seed=_seed(config.seed, self.runtime.rank, state.global_step),
            teacher_target=config.teacher_target,
            teacher_foreground=config.teacher_foreground,
            amp=config.amp,
        )
        optimizer_step(
            loss, self.optimizer, self.scaler, self.student.parameters(), config.clip_grad
        )
        ema_update(self.teacher, self.student, decay)
        self.last = (x, mask, rec, hard_frac)
        return StepLog(
            loss,
            x.shape[0],
            {"hard_frac": hard_frac, "lr": lr},
            {"hard share": "none" if hard_frac is None else f"{hard_frac:.2f}"},
        )

    def on_train_epoch_end(self) -> None:
        epoch = self.state.epoch
        every = self.config.preview_every
        if self.runtime.main and every and self.last is not None and (epoch + 1) % every == 0:
            x, mask, rec, hard_frac = self.last
            hard = mask.hard if mask.hard.dim() == 5 else None
            save_preview(
                self.out / "previews" / f"epoch_{epoch:04d}.png",
                x.detach(),
                mask.active,
                hard,
                denormalized(rec.detach(), x, self.student.patch_size),
                title=f"pretraining, epoch {epoch + 1} of {self.config.epochs}: mask "
                f"ratio {self.config.mask_ratio:g}, hard share "
                + (
                    "none (random masks)"
                    if hard_frac is None
                    else f"{hard_frac:.2f} of the hidden patches"
                ),
            )

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.guidance is not None and self.state.global_step == 0:
            self.guidance.record(self.teacher, self.state, self.metrics)  # the initialization

    def on_step_end(self) -> None:
        if self.guidance is not None and self.guidance.due(self.state.global_step, epoch_end=False):
            self.guidance.record(self.teacher, self.state, self.metrics)

    def on_epoch_end(self) -> None:
        config, epoch = self.config, self.state.epoch
        if self.guidance is not None and self.guidance.due(self.state.global_step, epoch_end=True):
            self.guidance.record(self.teacher, self.state, self.metrics)
        if config.save_every and epoch % config.save_every == 0:
            self.save(self.out / f"checkpoint_epoch_{epoch:04d}.pt")
        if self.runtime.main and not self.spec.is_stunet:
            export_resenc(
                self.student,
                self.spec,
                self.out,
                in_channels=self.in_channels,
                crop=config.crop,
                spacing=config.spacing,
                modality=self.modality,
                dataset_name=Path(config.data).name if config.data else "phantom",
                epochs=epoch,
                save=ckpt.atomic_save,
                write_text=ckpt.atomic_write_text,
            )
        elif self.runtime.main:
            encoder = self.student.encoder_state_dict()
            _export_encoder(encoder, self.signature, self.out / "encoder.pt")
            export_pretrained(
                encoder,
                self.out / f"stunet_{config.size}_pretrained.pth",
                size=config.size,
                in_channels=self.in_channels,
                source=str(self.out / "encoder.pt"),
                save=ckpt.atomic_save,
            )

    def on_train_end(self) -> None:
        out, size = self.out, self.config.size
        if not self.spec.is_stunet:
            tag = self.spec.name.replace("-", "_")
            self.say(
                f"  done: outputs in {out}/: {tag}_pretrained.pth (the whole "
                "ResidualEncoderUNet, for nnU-Net's -pretrained_weights), nnssl/ "
                "(checkpoint_final.pth and adaptation_plan.json, nnssl's format), "
                "checkpoint_latest.pt, previews/, metrics.jsonl"
            )
            self.say(
                "  next: fine-tune from it: python -m anatomask_fast.train finetune --data "
                f"LABELLED_DATASET --network {self.spec.name} --pretrained "
                f"{out / f'{tag}_pretrained.pth'}"
            )
            return
        self.say(
            f"  done: outputs in {out}/: encoder.pt (the encoder's weights), "
            f"stunet_{size}_pretrained.pth (for STU-Net's / nnU-Net's -pretrained_weights), "
            "checkpoint_latest.pt, previews/, metrics.jsonl"
        )
        if self.config.demo and out / "encoder.pt" == Path(DEMO_ENCODER):
            self.say(
                "  next: fine-tune from it on the labelled phantom: python -m "
                f"anatomask_fast.train finetune (it starts from {DEMO_ENCODER})"
            )
        else:
            self.say(
                "  next: fine-tune from it: python -m anatomask_fast.train finetune --data "
                f"LABELLED_DATASET --size {size} --pretrained {out / 'encoder.pt'}"
            )

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"model": self.student, "teacher": self.teacher}

    def checkpoint(self) -> dict:
        # what measuring the run needs to read data as it did
        return {
            **super().checkpoint(),
            "normalization": self.normalization,
            "steps_per_epoch": self.steps_per_epoch,
        }


def run(config: PretrainConfig) -> Path:
    return train(Pretraining, config)


def _export_encoder(weights: dict[str, torch.Tensor], signature: dict, path: Path) -> None:
    """The dense STU-Net encoder's weights (``conv_blocks_context...``), also under
    ``network_weights`` as nnU-Net's loader expects."""
    ckpt.atomic_save(
        {
            "format": "anatomask_fast.encoder/1",
            "size": signature["size"],
            "in_channels": signature["in_channels"],
            "state_dict": weights,
            "network_weights": weights,
        },
        path,
    )

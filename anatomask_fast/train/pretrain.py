"""``python -m anatomask_fast.train pretrain``: AnatoMask pretraining (SPEC section 5).

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
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from .. import anatomical_mask, patch_recon_loss, random_mask
from ..models.export import export_pretrained
from ..models.networks import NetworkSpec, export_resenc, network_spec, pretraining_network
from ..ops.mask_select import MaskResult
from ..schedules import MaskingSchedule, masking_schedule
from . import checkpoint as ckpt
from .config import PretrainConfig, save as save_config
from .inputs import job_volumes
from .optim import ema_decay_at_epoch, ema_update, linear_warmup_cosine_annealing, param_groups
from .guidance_probe import TrainingGuidance
from .sampling import BatchOrder, RandomCrops, epoch_loader
from .teacher import check_target, ranking_errors, teacher_reconstruction
from .previews import denormalized, save_preview
from .runtime import (MetricsLog, Runtime, autocast, checked_loss, finish_step,
                      optimizer_step, progress_bar, run_job, seed_step)

FORMAT = "anatomask_fast.pretrain/1"
# How --hard-max parameterizes each schedule kind (see anatomask_fast.schedules).
SCHEDULE_LEVEL = {"linear": lambda v: {"max_frac": v}, "hard_to_easy": lambda v: {"max_frac": v},
                  "cosine": lambda v: {"end": v}, "constant": lambda v: {"value": v}}


@dataclasses.dataclass
class TrainState:
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0


def _seed(*values: int) -> int:
    return int(np.random.SeedSequence(list(values)).generate_state(1, dtype=np.uint64)[0] >> 1)


class StepResult(NamedTuple):
    loss: torch.Tensor            # the student's loss (section 3 of SPEC)
    mask: MaskResult              # the anatomical mask the student saw
    rec: torch.Tensor             # the student's reconstruction, in x's dtype
    teacher_mask: MaskResult      # the teacher pass's random mask (the mask, without one)
    teacher_errors: torch.Tensor | None  # its per-patch errors (B, L), zero at visible patches


def pretrain_step(student: torch.nn.Module, teacher: torch.nn.Module, x: torch.Tensor, *,
                  mask_ratio: float, hard_frac: float | None, seed: int,
                  teacher_target: str = "raw", teacher_foreground: bool = False,
                  amp: str = "none",
                  noise: torch.Tensor | None = None) -> StepResult:
    """One published step up to the loss: a random mask, the eval-mode teacher's
    per-patch errors, the anatomical mask, the student's (training-mode) loss. Runs in
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
    rec = teacher_reconstruction(teacher, x, teacher_mask.active, amp)
    errors = ranking_errors(rec, x, teacher_mask.active, patch, target=teacher_target,
                            foreground=teacher_foreground)
    with torch.no_grad():
        mask = anatomical_mask(errors.view(shape), mask_ratio, hard_frac, noise=noise,
                               seed=None if noise is not None else _seed(seed, 1))
    with autocast(x.device, amp):
        rec = student(x, mask.active).to(x.dtype)
    loss, _ = patch_recon_loss(rec, x, mask.active, patch, norm_pix=True)
    return StepResult(loss, mask, rec, teacher_mask, errors)


def published_hard_frac(schedule: MaskingSchedule | None, config: PretrainConfig, epoch: int,
                        step: int) -> float | None:
    """hard_frac of the schedule; capped at --hard-max unless reference-compatible;
    None without a schedule (--hard-schedule none)."""
    if schedule is None:
        return None
    value = schedule(epoch, step)
    return value if config.reference_compatible else min(value, config.hard_max)


def check_method_options(config: PretrainConfig) -> None:
    """Reject method settings that are unknown or contradict --reference-compatible."""
    try:
        check_target(config.teacher_target)
    except ValueError as error:
        raise ValueError(f"pretrain: {error}") from None
    if config.reference_compatible:
        departures = [flag for flag, on in (
            (f"--teacher-target {config.teacher_target}", config.teacher_target != "raw"),
            ("--teacher-foreground", config.teacher_foreground),
            ("--hard-schedule none", config.hard_schedule == "none"),
            (f"--network {config.network}", config.network != "stunet"),
            ("--per-sample-norm", config.per_sample_norm),
            ("--decay-exempt", config.decay_exempt)) if on]
        if departures:
            raise ValueError(f"pretrain: --reference-compatible is the published step; it "
                             f"cannot be combined with {', '.join(departures)}")


def build_optimizer(student: torch.nn.Module, config: PretrainConfig) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.999); weight decay on every parameter as published, or not on
    biases, norms and mask tokens with --decay-exempt. The learning rate is set per
    epoch (:func:`epoch_lr`)."""
    params = param_groups(student, config.weight_decay) if config.decay_exempt else \
        [p for p in student.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=epoch_lr(config, 0), betas=(0.9, 0.999),
                             weight_decay=config.weight_decay)


def epoch_lr(config: PretrainConfig, epoch: int) -> float:
    return linear_warmup_cosine_annealing(epoch, base_lr=config.lr,
                                          warmup_epochs=config.warmup_epochs,
                                          max_epochs=config.epochs,
                                          warmup_start_lr=config.warmup_start_lr,
                                          eta_min=config.min_lr)


def _model_signature(config: PretrainConfig, in_channels: int, spec: NetworkSpec) -> dict:
    return {"format": FORMAT, "size": config.size, "in_channels": in_channels,
            "per_sample_norm": config.per_sample_norm, **spec.signature()}


def run(config: PretrainConfig) -> Path:
    return run_job(config, _train)


def _train(config: PretrainConfig, runtime: Runtime, out: Path) -> Path:
    check_method_options(config)
    if config.plans and config.network == "stunet":
        raise ValueError("pretrain: --plans describes a ResEnc network (--network resenc-m, "
                         "resenc-l or resenc-xl); STU-Net pretraining takes --size")
    spec = network_spec(config.network, config.size, config.plans, config.configuration)
    if config.crop is None:                       # a ResEnc's default: its patch size
        config = dataclasses.replace(config, crop=spec.patch_size)
    torch.manual_seed(config.seed)
    volumes = job_volumes(config, out, runtime)
    in_channels = volumes.channels
    say = print if runtime.main else (lambda *a, **k: None)
    say(f"anatomask_fast pretrain: data = {volumes.description}"
        + (" (embedded demonstration: procedural phantom)" if config.demo else ""))
    say(f"  model {spec.describe()}, crop {config.crop}, batch {config.batch_size} x "
        f"{runtime.world_size} process(es), {config.epochs} epochs, device {runtime.device}, "
        f"{'reference-compatible' if config.reference_compatible else 'library defaults'}")

    student = pretraining_network(spec, in_channels, per_sample_norm=config.per_sample_norm,
                                  # torch's SyncBatchNorm runs on CUDA only; on CPU (gloo)
                                  # each process keeps its own decoder BatchNorm statistics.
                                  sync_bn=runtime.distributed and runtime.device.type == "cuda",
                                  ).to(runtime.device)
    for unused in student.unused_in_lean_mode():
        unused.requires_grad_(False)     # the full-resolution densify the decoder never reads
    teacher = copy.deepcopy(student).requires_grad_(False).eval()   # timm ModelEma's copy
    optimizer = build_optimizer(student, config)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=config.amp == "fp16")
    data = RandomCrops(volumes, config.crop, seed=config.seed, rank=runtime.rank,
                       batch_size=config.batch_size, augmentation=config.augmentation)
    steps_per_epoch = config.steps_per_epoch or max(
        1, len(volumes) // (config.batch_size * runtime.world_size))   # demo: a pass over the cases
    sampler = BatchOrder(steps_per_epoch, config.batch_size)
    schedule = None if config.hard_schedule == "none" else masking_schedule(
        config.hard_schedule, total_epochs=config.epochs,
        steps_per_epoch=steps_per_epoch if config.schedule_by == "step" else None,
        **SCHEDULE_LEVEL.get(config.hard_schedule, lambda v: {})(config.hard_max))
    state = TrainState()
    signature = _model_signature(config, in_channels, spec)
    latest = out / "checkpoint_latest.pt"
    if config.resume:
        state = _restore(latest, signature, student, teacher, optimizer, scaler)
        say(f"  resumed from {latest} at epoch {state.epoch}, step {state.global_step}")
    if runtime.main:
        save_config(config, out / "config.json")
    model = DistributedDataParallel(student) if runtime.distributed else student
    metrics = MetricsLog(out, runtime.main)
    guidance = TrainingGuidance(config, volumes.normalization, out, steps_per_epoch) \
        if config.guidance_data and runtime.main else None
    if guidance is not None and state.global_step == 0:
        guidance.record(teacher, state, metrics)            # the initialization

    def save(path: Path) -> None:
        if runtime.main:
            ckpt.atomic_save({**signature, "model": student.state_dict(),
                              "teacher": teacher.state_dict(), "optimizer": optimizer.state_dict(),
                              "scaler": scaler.state_dict(), "state": dataclasses.asdict(state),
                              "config": dataclasses.asdict(config),
                              # what measuring the run needs to read data as it did
                              "normalization": volumes.normalization,
                              "steps_per_epoch": steps_per_epoch}, path)

    progress = progress_bar(runtime, config.epochs * steps_per_epoch, state.global_step,
                            "pretrain")
    mask = None                 # none yet when resumed from the last step of an epoch
    while state.epoch < config.epochs:
        batches = iter(epoch_loader(data, sampler, epoch=state.epoch,
                                    start_step=state.step_in_epoch, workers=config.workers))
        while state.step_in_epoch < steps_per_epoch:
            batch = next(batches)
            x = batch["image"].to(runtime.device, non_blocking=True)
            # Learning rate and EMA decay are set once per epoch, as published.
            lr = epoch_lr(config, state.epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            decay = ema_decay_at_epoch(state.epoch, config.epochs, config.ema_start,
                                       config.ema_end)
            hard_frac = published_hard_frac(schedule, config, state.epoch, state.step_in_epoch)
            seed_step(config.seed, runtime.rank, state.global_step)
            started = time.perf_counter()
            loss, mask, rec, _, _ = pretrain_step(
                model, teacher, x, mask_ratio=config.mask_ratio, hard_frac=hard_frac,
                seed=_seed(config.seed, runtime.rank, state.global_step),
                teacher_target=config.teacher_target,
                teacher_foreground=config.teacher_foreground, amp=config.amp)
            optimizer_step(loss, optimizer, scaler, student.parameters(), config.clip_grad)
            ema_update(teacher, student, decay)
            loss_value = checked_loss(loss, state.epoch, state.global_step, latest)
            elapsed = time.perf_counter() - started
            stop = finish_step(state, config, runtime, metrics, progress, lambda: save(latest),
                               {"loss": loss_value, "hard_frac": hard_frac, "lr": lr,
                                "batch_size": x.shape[0], "step_seconds": elapsed,
                                "samples_per_second": x.shape[0] / elapsed},
                               {"loss": f"{loss_value:.4f}",
                                "hard": "none" if hard_frac is None else f"{hard_frac:.2f}",
                                "vol_s": f"{x.shape[0] * runtime.world_size / elapsed:.2f}"})
            if guidance is not None and guidance.due(state.global_step, epoch_end=False):
                guidance.record(teacher, state, metrics)
            if stop:
                progress.close()
                say(f"  stopped after {state.global_step} steps (--stop-after-steps): {latest} "
                    "written, continue with --resume")
                return out
        if runtime.main and config.preview_every and mask is not None \
                and (state.epoch + 1) % config.preview_every == 0:
            hard = mask.hard if mask.hard.dim() == 5 else None
            save_preview(out / "previews" / f"epoch_{state.epoch:04d}.png", x.detach(),
                         mask.active, hard, denormalized(rec.detach(), x, student.patch_size))
        state.epoch += 1
        state.step_in_epoch = 0
        if guidance is not None and guidance.due(state.global_step, epoch_end=True):
            guidance.record(teacher, state, metrics)
        if config.save_every and state.epoch % config.save_every == 0:
            save(out / f"checkpoint_epoch_{state.epoch:04d}.pt")
        if runtime.main and not spec.is_stunet:
            export_resenc(student, spec, out, in_channels=in_channels, crop=config.crop,
                          spacing=config.spacing,
                          modality=volumes.normalization.get("modality", config.modality),
                          dataset_name=Path(config.data).name if config.data else "phantom",
                          epochs=state.epoch, save=ckpt.atomic_save,
                          write_text=ckpt.atomic_write_text)
        elif runtime.main:
            encoder = student.encoder_state_dict()
            _export_encoder(encoder, signature, out / "encoder.pt")
            export_pretrained(encoder, out / f"stunet_{config.size}_pretrained.pth",
                              size=config.size, in_channels=in_channels,
                              source=str(out / "encoder.pt"), save=ckpt.atomic_save)
        save(latest)    # last: killed before it, a resumed run redoes this epoch's end
    progress.close()
    metrics.close()
    say(f"  done: encoder weights in {out / ('encoder.pt' if spec.is_stunet else 'nnssl')}, "
        f"checkpoints in {out}")
    return out


def _export_encoder(weights: dict[str, torch.Tensor], signature: dict, path: Path) -> None:
    """The dense STU-Net encoder's weights (``conv_blocks_context...``), also under
    ``network_weights`` as nnU-Net's loader expects."""
    ckpt.atomic_save({"format": "anatomask_fast.encoder/1", "size": signature["size"],
                      "in_channels": signature["in_channels"], "state_dict": weights,
                      "network_weights": weights}, path)


def _restore(path: Path, signature: dict, student, teacher, optimizer, scaler) -> TrainState:
    saved = ckpt.load(path)
    ckpt.check_compatible(saved, signature, path)
    student.load_state_dict(saved["model"])
    teacher.load_state_dict(saved["teacher"])
    optimizer.load_state_dict(saved["optimizer"])
    scaler.load_state_dict(saved["scaler"])
    return TrainState(**saved["state"])

"""``python -m anatomask_fast.train pretrain``: AnatoMask pretraining (SPEC section 5).

One step, all on the device: a random mask, the EMA teacher's reconstruction and its
per-patch errors (fused loss kernel), the anatomical mask (one selection launch), the
student's reconstruction and loss, AdamW with clipping, the EMA update. Masks are
seeded from (seed, rank, step), and data from (seed, epoch, index), so a resumed run
repeats exactly what an uninterrupted one does.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from .. import anatomical_mask, patch_recon_loss, random_mask
from ..models.anatomask import AnatoMaskNet
from ..models.export import export_pretrained
from ..schedules import masking_schedule
from . import checkpoint as ckpt
from .config import PretrainConfig, save as save_config
from .data import CropDataset, ResumableSampler, epoch_loader, job_dataset
from .optim import ema_decay, ema_update, param_groups, warmup_cosine
from .previews import denormalized, save_preview
from .runtime import (MetricsLog, Runtime, autocast, checked_loss, finish_step,
                      optimizer_step, progress_bar, run_job)

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


def pretrain_step(student: torch.nn.Module, teacher: torch.nn.Module, x: torch.Tensor, *,
                  mask_ratio: float, hard_frac: float, seed: int, raw_teacher_target: bool,
                  amp: str = "none"):
    """Teacher pass, anatomical mask, student loss. Returns (loss, mask, rec)."""
    patch = teacher.patch_size
    shape = (x.shape[0], 1, *(s // patch for s in x.shape[2:]))
    with torch.no_grad(), autocast(x.device, amp):
        teacher_mask = random_mask(shape, mask_ratio, device=x.device, seed=_seed(seed, 0))
        rec = teacher(x, teacher_mask.active).float()
        # Reference quirk: the teacher's error is against the raw patch.
        _, errors = patch_recon_loss(rec, x, teacher_mask.active, patch,
                                     norm_pix=not raw_teacher_target, hidden_only=True)
        mask = anatomical_mask(errors.view(shape), mask_ratio, hard_frac, seed=_seed(seed, 1))
    with autocast(x.device, amp):
        rec = student(x, mask.active).float()
    loss, _ = patch_recon_loss(rec, x, mask.active, patch, norm_pix=True)
    return loss, mask, rec


def _model_signature(config: PretrainConfig, in_channels: int) -> dict:
    return {"format": FORMAT, "size": config.size, "in_channels": in_channels,
            "per_sample_norm": not config.reference_compatible}


def run(config: PretrainConfig) -> Path:
    return run_job(config, _train)


def _train(config: PretrainConfig, runtime: Runtime, out: Path) -> Path:
    torch.manual_seed(config.seed)
    dataset = job_dataset(config.data, out, runtime, modality=config.modality,
                          phantom_cases=config.phantom_cases, seed=config.seed)
    in_channels = len(dataset.cases[0].images)
    say = print if runtime.main else (lambda *a, **k: None)
    say(f"anatomask_fast pretrain: data = {dataset.description}"
        + (" (embedded demonstration: procedural phantom)" if config.demo else ""))
    say(f"  model STU-Net-{config.size}, crop {config.crop}, batch {config.batch_size} x "
        f"{runtime.world_size} process(es), {config.epochs} epochs, device {runtime.device}, "
        f"{'reference-compatible' if config.reference_compatible else 'library defaults'}")

    student = AnatoMaskNet(config.size, in_channels,
                           per_sample_norm=not config.reference_compatible,
                           # torch's SyncBatchNorm runs on CUDA only; on CPU (gloo) each
                           # process keeps its own decoder BatchNorm statistics.
                           sync_bn=runtime.distributed and runtime.device.type == "cuda",
                           ).to(runtime.device)
    for unused in student.unused_in_lean_mode():
        unused.requires_grad_(False)     # the full-resolution densify the decoder never reads
    teacher = copy.deepcopy(student).requires_grad_(False)
    optimizer = torch.optim.AdamW(param_groups(student, config.weight_decay), lr=config.lr,
                                  betas=(0.9, 0.999))
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=config.amp == "fp16")
    data = CropDataset(dataset, config.crop, seed=config.seed, spacing=config.spacing)
    sampler = ResumableSampler(len(data), seed=config.seed, rank=runtime.rank,
                               world_size=runtime.world_size)
    steps_per_epoch = config.steps_per_epoch or max(1, len(sampler) // config.batch_size)
    schedule = masking_schedule(
        config.hard_schedule, total_epochs=config.epochs,
        steps_per_epoch=steps_per_epoch if config.schedule_by == "step" else None,
        **SCHEDULE_LEVEL.get(config.hard_schedule, lambda v: {})(config.hard_max))
    state = TrainState()
    signature = _model_signature(config, in_channels)
    latest = out / "checkpoint_latest.pt"
    if config.resume:
        state = _restore(latest, signature, student, teacher, optimizer, scaler)
        say(f"  resumed from {latest} at epoch {state.epoch}, step {state.global_step}")
    if runtime.main:
        save_config(config, out / "config.json")
    model = DistributedDataParallel(student) if runtime.distributed else student
    metrics = MetricsLog(out, runtime.main)

    def save(path: Path) -> None:
        if runtime.main:
            ckpt.atomic_save({**signature, "model": student.state_dict(),
                              "teacher": teacher.state_dict(), "optimizer": optimizer.state_dict(),
                              "scaler": scaler.state_dict(), "state": dataclasses.asdict(state),
                              "config": dataclasses.asdict(config)}, path)

    progress = progress_bar(runtime, config.epochs * steps_per_epoch, state.global_step,
                            "pretrain")
    while state.epoch < config.epochs:
        loader = epoch_loader(data, sampler, epoch=state.epoch, start_step=state.step_in_epoch,
                              batch_size=config.batch_size, workers=config.workers)
        batches = iter(loader)
        while state.step_in_epoch < steps_per_epoch:
            batch = next(batches, None)
            if batch is None:   # a pass shorter than steps_per_epoch: start the order again
                sampler.set_epoch(state.epoch, start=0)
                batches = iter(loader)
                batch = next(batches)
            x = batch["image"].to(runtime.device, non_blocking=True)
            epochs_done = state.epoch + state.step_in_epoch / steps_per_epoch
            lr = warmup_cosine(epochs_done, base_lr=config.lr, min_lr=config.min_lr,
                               warmup_epochs=config.warmup_epochs, total_epochs=config.epochs)
            for group in optimizer.param_groups:
                group["lr"] = lr
            hard_frac = schedule(state.epoch, state.step_in_epoch)
            started = time.perf_counter()
            loss, mask, rec = pretrain_step(
                model, teacher, x, mask_ratio=config.mask_ratio, hard_frac=hard_frac,
                seed=_seed(config.seed, runtime.rank, state.global_step),
                raw_teacher_target=config.reference_compatible, amp=config.amp)
            optimizer_step(loss, optimizer, scaler, student.parameters(), config.clip_grad)
            ema_update(teacher, student, ema_decay(epochs_done, config.epochs,
                                                   config.ema_start, config.ema_end))
            loss_value = checked_loss(loss, state.epoch, state.global_step, latest)
            elapsed = time.perf_counter() - started
            if finish_step(state, config, runtime, metrics, progress, lambda: save(latest),
                           {"loss": loss_value, "hard_frac": hard_frac, "lr": lr,
                            "step_seconds": elapsed, "samples_per_second": x.shape[0] / elapsed},
                           {"loss": f"{loss_value:.4f}", "hard": f"{hard_frac:.2f}",
                            "vol_s": f"{x.shape[0] * runtime.world_size / elapsed:.2f}"}):
                progress.close()
                say(f"  stopped after {state.global_step} steps (--stop-after-steps)")
                return out
        if runtime.main and config.preview_every and (state.epoch + 1) % config.preview_every == 0:
            hard = mask.hard if mask.hard.dim() == 5 else None
            save_preview(out / "previews" / f"epoch_{state.epoch:04d}.png", x.detach(),
                         mask.active, hard, denormalized(rec.detach(), x, student.patch_size))
        state.epoch += 1
        state.step_in_epoch = 0
        save(latest)
        if config.save_every and state.epoch % config.save_every == 0:
            save(out / f"checkpoint_epoch_{state.epoch:04d}.pt")
        if runtime.main:
            _export_encoder(student, signature, out / "encoder.pt")
            export_pretrained(student.encoder_state_dict(), out / f"stunet_{config.size}_pretrained.pth", size=config.size, in_channels=in_channels, source=str(out / "encoder.pt"), save=ckpt.atomic_save)
    progress.close()
    metrics.close()
    say(f"  done: encoder weights in {out / 'encoder.pt'}, checkpoints in {out}")
    return out


def _export_encoder(model: AnatoMaskNet, signature: dict, path: Path) -> None:
    """The dense STU-Net encoder's weights (``conv_blocks_context...``), also under
    ``network_weights`` as nnU-Net's loader expects."""
    weights = model.encoder_state_dict()
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

"""Optimizer and schedules of the reference: AdamW without weight decay on biases,
norms and mask tokens; linear warm-up then cosine learning rate; an EMA teacher whose
decay rises linearly over the first quarter of training."""
from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay on weights of convolutions; none on biases, norm parameters (1-D) and mask
    tokens."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or "mask_token" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(progress_epochs: float, *, base_lr: float, min_lr: float,
                  warmup_epochs: float, total_epochs: float) -> float:
    """Learning rate at a (fractional) epoch: linear from 0 over the warm-up, then a
    cosine from ``base_lr`` to ``min_lr`` at ``total_epochs``."""
    if progress_epochs < warmup_epochs:
        return base_lr * progress_epochs / warmup_epochs
    span = max(total_epochs - warmup_epochs, 1e-12)
    t = min(1.0, (progress_epochs - warmup_epochs) / span)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * t))


def ema_decay(progress_epochs: float, total_epochs: float, start: float = 0.999,
              end: float = 0.9999) -> float:
    """Rises linearly from ``start`` to ``end`` over the first quarter of training."""
    ramp = max(total_epochs / 4, 1e-12)
    return start + (end - start) * min(1.0, progress_epochs / ramp)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher = decay * teacher + (1 - decay) * student, for parameters and float
    buffers (BatchNorm running statistics); integer buffers are copied."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.lerp_(s.detach(), 1 - decay)
    for t, s in zip(teacher.buffers(), student.buffers()):
        if t.dtype.is_floating_point:
            t.lerp_(s, 1 - decay)
        else:
            t.copy_(s)

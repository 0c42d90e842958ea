"""A drop-in AnatoMask masker for existing masked-image-modeling code.

It owns the masking dynamics (the hard fraction's schedule and the epoch/step
counter), draws the teacher's random masks and the anatomical masks from per-patch
errors on the device, returns both conventions (visible grid and MAE ids), seeds each
mask from (seed, rank, step) so that ranks differ and runs repeat, and saves its state
for resume::

    masker = AnatoMasker(grid=(7, 7, 8), mask_ratio=0.6, total_epochs=100)
    teacher_mask = masker.random(batch_size, device)          # (B, 1, 7, 7, 8) + ids
    errors = masker.errors(teacher_rec, x, teacher_mask)      # fused per-patch loss
    mask = masker.anatomical(errors)                          # AnatoMask's mask
    ...
    masker.step()                                             # after each optimizer step
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .ops.mask_select import MaskResult, anatomical_mask, random_mask
from .ops.patch_loss import patch_recon_loss
from .schedules import masking_schedule


class AnatoMasker:
    """Masks for a patch grid ``grid`` (h, w, d), or ``num_patches`` for token models.

    ``schedule``: a kind of :func:`anatomask_fast.schedules.masking_schedule` ("linear",
    the reference's easy-to-hard default, "hard_to_easy", "cosine", "constant", "step",
    a float, or a callable), with ``schedule_params``; ``by_step`` moves it every step
    instead of every epoch. ``rank`` defaults to the torch.distributed rank.
    """

    def __init__(
        self,
        *,
        grid: Sequence[int] | None = None,
        num_patches: int | None = None,
        mask_ratio: float = 0.6,
        total_epochs: int,
        steps_per_epoch: int | None = None,
        schedule: str | float | Callable = "linear",
        by_step: bool = False,
        seed: int = 0,
        rank: int | None = None,
        **schedule_params,
    ) -> None:
        if (grid is None) == (num_patches is None):
            raise ValueError("AnatoMasker: give exactly one of 'grid' (h, w, d) or 'num_patches'")
        if grid is not None and (len(grid) != 3 or min(grid) <= 0):
            raise ValueError(f"AnatoMasker: argument 'grid' must be 3 positive ints, got {grid}")
        if by_step and steps_per_epoch is None:
            raise ValueError("AnatoMasker: by_step=True needs 'steps_per_epoch'")
        self.grid = tuple(grid) if grid is not None else None
        self.num_patches = math.prod(self.grid) if grid is not None else int(num_patches)
        self.mask_ratio = mask_ratio
        self.schedule = masking_schedule(
            schedule,
            total_epochs=total_epochs,
            steps_per_epoch=steps_per_epoch if by_step else None,
            **schedule_params,
        )
        self.steps_per_epoch = steps_per_epoch
        self.by_step = by_step
        self.seed = seed
        self.rank = (
            rank
            if rank is not None
            else (dist.get_rank() if dist.is_available() and dist.is_initialized() else 0)
        )
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0

    # -- counters -------------------------------------------------------------------
    def step(self) -> None:
        """Call once per optimizer step."""
        self.global_step += 1
        self.step_in_epoch += 1
        if self.steps_per_epoch is not None and self.step_in_epoch >= self.steps_per_epoch:
            self.set_epoch(self.epoch + 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.step_in_epoch = epoch, 0

    @property
    def hard_frac(self) -> float:
        return self.schedule(self.epoch, self.step_in_epoch if self.by_step else 0)

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.seed = state["global_step"], state["seed"]

    # -- masks ----------------------------------------------------------------------
    def _shape(self, batch: int) -> tuple[int, ...]:
        return (batch, 1, *self.grid) if self.grid is not None else (batch, self.num_patches)

    def _seed(self, purpose: int) -> int:
        state = np.random.SeedSequence([self.seed, self.rank, self.global_step, purpose])
        return int(state.generate_state(1, dtype=np.uint64)[0] >> 1)

    def random(self, batch_size: int, device: torch.device | str) -> MaskResult:
        """The teacher pass's uniform random mask (exactly len_keep visible per sample)."""
        return random_mask(
            self._shape(batch_size), self.mask_ratio, device=device, seed=self._seed(0)
        )

    def anatomical(self, errors: torch.Tensor) -> MaskResult:
        """AnatoMask's mask from per-patch errors (B, L) or (B, 1, h, w, d) at the
        current hard fraction."""
        expected = self._shape(errors.shape[0]) if errors.dim() else None
        flat_ok = errors.dim() == 2 and errors.shape[1] == self.num_patches
        if not (flat_ok or tuple(errors.shape) == expected):
            raise ValueError(
                f"AnatoMasker: argument 'errors' must be (B, {self.num_patches})"
                + (f" or (B, 1, {', '.join(map(str, self.grid))})" if self.grid else "")
                + f" for this masker, got {tuple(errors.shape)}"
            )
        return anatomical_mask(errors, self.mask_ratio, self.hard_frac, seed=self._seed(1))

    @torch.no_grad()
    def errors(
        self,
        rec: torch.Tensor,
        x: torch.Tensor,
        mask: MaskResult,
        patch_size: int | Sequence[int],
        *,
        raw_target: bool = True,
    ) -> torch.Tensor:
        """The teacher's per-patch errors (B, L) from its reconstruction of volumes
        (B, C, H, W, D), by the fused loss; ``raw_target`` is the reference's choice."""
        active = (
            mask.active if mask.active.dim() == 5 else mask.active.view(self._shape(x.shape[0]))
        )
        _, per_patch = patch_recon_loss(
            rec, x, active, patch_size, norm_pix=not raw_target, hidden_only=True
        )
        return per_patch

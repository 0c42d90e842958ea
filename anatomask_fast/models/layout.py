"""The mask layout of one training step: which patches are visible, where each sits
in the packed tensors, its neighbours, and how each encoder stage runs.

Built once per step from the visible mask ``active`` (B, 1, h, w, d); every stage
shares the patch list, since the mask grid is the same at every resolution, only
the patch side ``q`` (16, 8, 4, 2, 1 for STU-Net; per axis where a network's strides
differ between axes) changes. A stage coarser than the mask grid (q below one voxel,
e.g. a ResEnc's sixth stage at 1/32 under 16^3 masks) is unmasked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..validation import check_tensor

Side = int | tuple[int, int, int]


@dataclass(frozen=True)
class StagePlan:
    side: Side | None  # patch side q at this stage's resolution (per axis), None: unmasked
    cost: float  # packed work relative to dense: ((q+2)/q)^3 * visible share
    packed: bool

    @property
    def masked(self) -> bool:
        """False for a stage coarser than the mask grid: it runs dense, all voxels
        visible (nnssl's SparK3D treats such stages so)."""
        return self.side is not None


@dataclass(frozen=True)
class MaskLayout:
    active: torch.Tensor  # (B, 1, h, w, d) bool
    patches: torch.Tensor  # (N,) int64 flat cell index, increasing
    slots: torch.Tensor  # (B, h, w, d) int64 packed index, -1 where hidden
    neighbours: torch.Tensor  # (N, 27) int64 packed index of each neighbour, -1 = zero
    sample: torch.Tensor  # (N,) int64 sample of each packed patch
    stages: tuple[StagePlan, ...]

    @property
    def batch(self) -> int:
        return self.active.shape[0]

    @property
    def visible_share(self) -> float:
        return self.patches.shape[0] / self.slots.numel()

    @classmethod
    def build(
        cls,
        active: torch.Tensor,
        *,
        stages: int = 5,
        packed_stages: int | None = None,
        sides: Sequence[Side | None] | None = None,
        packable: Sequence[bool] | None = None,
    ) -> MaskLayout:
        """The layout of ``active`` for an encoder of ``stages`` stages (stride 2
        between them, so the patch side at stage 0 is 2^(stages-1)), or of the stages
        whose patch ``sides`` are given (None: unmasked). Stages run packed while the
        halo overhead times the visible share is below 1 and the stage is
        ``packable`` (a prefix: the deepest stages, with the smallest patches, run
        dense-masked); ``packed_stages`` overrides how many."""
        check_tensor("MaskLayout", "active", active, ndim=5, dtypes=(torch.bool,))
        if active.shape[1] != 1:
            raise ValueError(
                f"MaskLayout: argument 'active' must have shape (B, 1, h, w, d), "
                f"got {tuple(active.shape)}"
            )
        if sides is None:
            sides = [2 ** (stages - 1 - s) for s in range(stages)]
        stages = len(sides)
        packable = [True] * stages if packable is None else list(packable)
        if packed_stages is not None and not 0 <= packed_stages <= stages:
            raise ValueError(
                f"MaskLayout: argument 'packed_stages' must lie in [0, {stages}], "
                f"got {packed_stages}"
            )
        B, _, h, w, d = active.shape
        flat = active.reshape(-1)
        # The one host synchronization of a step: the number of visible patches.
        patches = flat.nonzero().squeeze(1)
        n = patches.shape[0]
        slots = torch.full((B * h * w * d,), -1, dtype=torch.int64, device=active.device)
        slots[patches] = torch.arange(n, device=active.device)
        slots = slots.view(B, h, w, d)
        neighbours = _neighbour_table(slots, patches)
        share = n / max(flat.numel(), 1)
        plans, packing = [], True
        for s, q in enumerate(sides):
            cost = (
                math.inf
                if q is None
                else math.prod((a + 2) / a for a in ((q,) * 3 if isinstance(q, int) else q)) * share
            )
            packing = (
                packing
                and q is not None
                and packable[s]
                and (cost < 1 if packed_stages is None else s < packed_stages)
            )
            plans.append(StagePlan(q, cost, packing))
        return cls(active, patches, slots, neighbours, patches // (h * w * d), tuple(plans))


def _neighbour_table(slots: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    B, h, w, d = slots.shape
    padded = F.pad(slots, (1, 1, 1, 1, 1, 1), value=-1)  # outside = -1
    k = patches % d
    j = (patches // d) % w
    i = (patches // (d * w)) % h
    b = patches // (d * w * h)
    columns = [
        padded[b, i + 1 + oi, j + 1 + oj, k + 1 + ok]
        for oi in (-1, 0, 1)
        for oj in (-1, 0, 1)
        for ok in (-1, 0, 1)
    ]
    return torch.stack(columns, dim=1).contiguous()

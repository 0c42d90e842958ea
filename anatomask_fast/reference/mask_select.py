"""Reference mask selection: the published per-sample host loop.

For every sample: copy the errors to the host, argsort them (descending), take the
``n_hard`` largest, ``numpy.delete`` them from the index list, ``numpy.random.shuffle``
the rest and hide its first ``n_mask - n_hard``; copy back. Purely random (SparK's
``rand().argsort()``) when ``n_hard <= 0``.

Conventions shared by every backend, so that they can be compared exactly:
- errors are ranked as float32 (float64 input is rounded first), ties by lower index;
- with an explicit ``noise`` (B, L), the random part is the remaining patches with the
  smallest noise (as float32), ties by lower index: the shuffle becomes
  ``argsort(noise)``;
- ``ids_shuffle`` lists the kept patches, then the hidden ones, each in ascending
  index order; ``ids_restore = argsort(ids_shuffle)``.
Without noise, the reference draws from numpy's generator seeded with
``(seed, offset)``: reproducible, but not the kernels' Philox stream.
"""

from __future__ import annotations

import numpy as np
import torch


def ids_from_active(active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids_shuffle, ids_restore)`` of a (B, L) visible mask: kept patches first, then
    hidden ones, each in ascending index order (MAE convention: the first ``len_keep``
    of ``ids_shuffle`` are kept, ``ids_restore = argsort(ids_shuffle)``)."""
    ids_shuffle = torch.argsort((~active).to(torch.uint8), dim=1, stable=True)
    return ids_shuffle, torch.argsort(ids_shuffle, dim=1)


def _rng(seed: int, offset: int) -> np.random.Generator:
    return np.random.default_rng([seed, offset])


def anatomical_mask_reference(
    errors: torch.Tensor,
    noise: torch.Tensor | None,
    len_keep: int,
    n_hard: int,
    seed: int,
    offset: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(active, hard, ids_shuffle, ids_restore)`` for errors (B, L): ``active`` True =
    visible, ``hard`` True = hidden because of a top error. ``errors`` is not read when
    ``n_hard <= 0``."""
    B, L = errors.shape
    device = errors.device
    n_mask = L - len_keep
    if n_hard <= 0:
        if noise is None:
            seed_torch = int(_rng(seed, offset).integers(2**63))
            generator = torch.Generator(device=device).manual_seed(seed_torch)
            noise = torch.rand(B, L, generator=generator, device=device)
        hidden = torch.argsort(noise.float(), dim=1, stable=True)[:, :n_mask]
    else:
        rng = _rng(seed, offset) if noise is None else None
        rows = []
        for b in range(B):
            e = errors[b].float().cpu().numpy()
            order = np.argsort(-e, kind="stable")
            top = order[:n_hard]
            rest = np.delete(np.arange(L), top)
            if rng is not None:
                rng.shuffle(rest)
            else:
                rest = rest[np.argsort(noise[b].float().cpu().numpy()[rest], kind="stable")]
            rows.append(np.concatenate([top, rest[: n_mask - n_hard]]))
        hidden = torch.from_numpy(np.stack(rows)).to(device)
    active = torch.ones(B, L, dtype=torch.bool, device=device).scatter_(1, hidden, False)
    hard = torch.zeros(B, L, dtype=torch.bool, device=device)
    hard.scatter_(1, hidden[:, :n_hard], True)
    return (active, hard, *ids_from_active(active))

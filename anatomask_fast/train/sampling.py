"""Random crops for training, drawn with replacement, nnU-Net style: an epoch is
``steps_per_epoch`` full batches; sample ``j`` of step ``s`` of epoch ``e`` on rank
``r`` is a pure function of (seed, r, e, s, j): which case, where the crop is, the
augmentation. So batches are always full, ranks draw independent data, a resumed run
repeats an uninterrupted one, and the number of DataLoader workers changes nothing.

Fine-tuning oversamples foreground as nnU-Net does: the last
``round(batch * foreground)`` samples of every batch are centred on a random voxel of
a random class present in the case.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from . import augment
from .runtime import STOP_SIGNALS
from .volumes import Volumes


def sample_rng(seed: int, rank: int, epoch: int, step: int, sample: int) -> np.random.Generator:
    return np.random.default_rng([seed, rank, epoch, step, sample])


def forced_foreground(sample: int, batch_size: int, foreground: float | None) -> bool:
    """nnU-Net's rule: the samples after the first ``round(batch * (1 - share))``."""
    return foreground is not None and sample >= round(batch_size * (1.0 - foreground))


def _start(
    shape: Sequence[int],
    size: Sequence[int],
    rng: np.random.Generator,
    centre: Sequence[int] | None,
) -> list[int]:
    """The region's first voxel: random inside the volume, or with ``centre`` the region
    centred there, kept inside; along an axis shorter than the region: centred
    (zero-padded)."""
    start = []
    for axis, (s, n) in enumerate(zip(shape, size)):
        if s < n:
            start.append((s - n) // 2)
        elif centre is None:
            start.append(int(rng.integers(0, s - n + 1)))
        else:
            start.append(int(np.clip(centre[axis] - n // 2, 0, s - n)))
    return start


class RandomCrops(torch.utils.data.Dataset):
    """Indexed by (epoch, step, sample); returns {"image": (C, *crop) float32} and,
    with ``labels``, {"label": (1, *crop) int64}."""

    def __init__(
        self,
        volumes: Volumes,
        crop: Sequence[int],
        *,
        seed: int,
        rank: int,
        batch_size: int,
        augmentation: str,
        labels: bool = False,
        foreground: float | None = None,
    ) -> None:
        self.volumes, self.crop = volumes, tuple(crop)
        self.seed, self.rank, self.batch_size = seed, rank, batch_size
        self.augmentation = augment.check_mode(augmentation)
        self.labels, self.foreground = labels, foreground

    def __len__(self) -> int:
        return len(self.volumes)

    def draw(
        self, key: tuple[int, int, int]
    ) -> tuple[int, list[int], np.ndarray | None, np.random.Generator]:
        """(case, region start, spatial matrix, the rest of the sample's stream)."""
        epoch, step, sample = key
        rng = sample_rng(self.seed, self.rank, epoch, step, sample)
        index = int(rng.integers(len(self.volumes)))
        matrix = augment.spatial_matrix(rng, self.augmentation)
        size = augment.region_size(self.crop, matrix)
        centre = None
        if forced_foreground(sample, self.batch_size, self.foreground):
            table = self.volumes.locations(index)
            if len(table):
                classes = np.unique(table[:, 0])
                rows = table[table[:, 0] == classes[rng.integers(len(classes))]]
                centre = rows[rng.integers(len(rows)), 1:4].tolist()
        return index, _start(self.volumes.shape(index), size, rng, centre), matrix, rng

    def __getitem__(self, key: tuple[int, int, int]) -> dict:
        index, start, matrix, rng = self.draw(key)
        size = augment.region_size(self.crop, matrix)
        image, label = self.volumes.region(index, start, size, label=self.labels)
        image = torch.from_numpy(image)
        label = torch.from_numpy(label) if label is not None else None
        if matrix is not None:
            image, label = augment.warp(image, label, matrix, self.crop)
        if self.augmentation == "nnunet":
            image = augment.intensity(image, rng)
        if self.augmentation != "none":
            image, label = augment.mirror(image, label, rng)
        item = {"image": image.contiguous()}
        if label is not None:
            item["label"] = label.contiguous()
        return item


class BatchOrder(torch.utils.data.Sampler):
    """The (epoch, step, sample) keys of one epoch from ``start_step`` on."""

    def __init__(self, steps_per_epoch: int, batch_size: int) -> None:
        self.steps_per_epoch, self.batch_size = steps_per_epoch, batch_size
        self.epoch = self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        for step in range(self.start_step, self.steps_per_epoch):
            for sample in range(self.batch_size):
                yield self.epoch, step, sample

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.batch_size


def epoch_loader(
    crops: RandomCrops, order: BatchOrder, *, epoch: int, start_step: int, workers: int
) -> torch.utils.data.DataLoader:
    """Full batches of epoch ``epoch`` from step ``start_step`` on."""
    order.set_epoch(epoch, start_step)
    return _SignalSafeLoader(
        crops,
        batch_size=crops.batch_size,
        sampler=order,
        num_workers=workers,
        persistent_workers=False,
        drop_last=False,
        worker_init_fn=_worker_signals,
    )


class _SignalSafeLoader(torch.utils.data.DataLoader):
    """Forks its workers with SIGTERM / SIGUSR1 blocked (they inherit the mask), so that
    a signal to the whole process group cannot kill one before ``_worker_signals``."""

    def __iter__(self):
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _worker_signals(worker_id: int) -> None:
    """Loader workers leave SIGTERM / SIGUSR1 sent to the whole process group (cluster
    schedulers do) to the main process, which writes a checkpoint and then stops them;
    a SIGTERM from the main process itself (the loader's shutdown) still ends a worker."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    parent = os.getppid()

    def wait_for_parent() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(0)

    threading.Thread(target=wait_for_parent, daemon=True).start()

"""Volumes for training: discovery (a folder of NIfTI files or an nnU-Net raw
dataset), MONAI pre-processing and augmentation, and a resumable, rank-sharded,
seeded sampling order.

Determinism: the augmentation of sample ``index`` in epoch ``epoch`` is seeded from
``(seed, epoch, index)``, not from a worker's stream, so a batch does not depend on
how many workers loaded it, and a resumed run sees exactly the batches an
uninterrupted run would.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai import transforms as mt
from monai.data import CacheDataset

from .runtime import STOP_SIGNALS

NIFTI_SUFFIXES = (".nii", ".nii.gz")


class DataError(ValueError):
    """A dataset that cannot be used, with the file or folder named."""


@dataclass(frozen=True)
class Case:
    name: str
    images: tuple[Path, ...]          # one file per channel
    label: Path | None = None


@dataclass(frozen=True)
class Dataset:
    cases: tuple[Case, ...]
    modality: str                     # "CT", "MR" or "PET": picks the normalization
    description: str
    labels: dict[str, int] | None = None


def job_dataset(data: str | None, out: Path, runtime, *, modality: str, phantom_cases: int,
                seed: int, with_labels: bool = False) -> Dataset:
    """The dataset of a training job: ``data`` discovered, or without it the embedded
    phantom, written by rank 0 under ``out/data`` while the other ranks wait."""
    if data is not None:
        return discover(data, modality=modality, with_labels=with_labels)
    from .phantom import write_phantom_dataset

    root = write_phantom_dataset(out / "data", cases=phantom_cases, seed=seed) \
        if runtime.main else None
    if runtime.distributed:
        torch.distributed.barrier()
        root = next((out / "data").glob("phantom_*"))
    return discover(root, with_labels=with_labels)


def _is_nifti(path: Path) -> bool:
    return path.is_file() and path.name.endswith(NIFTI_SUFFIXES)


def _strip(name: str) -> str:
    return name[:-7] if name.endswith(".nii.gz") else name[:-4]


def _nnunet(root: Path, with_labels: bool) -> Dataset:
    meta_path = root / "dataset.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    channels = meta.get("channel_names") or meta.get("modality") or {"0": "CT"}
    files = sorted(p for p in (root / "imagesTr").iterdir() if _is_nifti(p))
    names = sorted({_strip(p.name)[:-5] for p in files if _strip(p.name)[-5:-4] == "_"})
    if not names:
        raise DataError(f"no nnU-Net images (CASE_0000.nii.gz) found in {root / 'imagesTr'}")
    cases = []
    for name in names:
        images = tuple(root / "imagesTr" / f"{name}_{int(c):04d}{_suffix(files)}"
                       for c in sorted(channels, key=int))
        missing = [str(p) for p in images if not p.exists()]
        if missing:
            raise DataError(f"case {name!r} lacks channel files: {missing}")
        label = None
        if with_labels:
            label = root / "labelsTr" / f"{name}{_suffix(files)}"
            if not label.exists():
                raise DataError(f"case {name!r} has no label file: {label} is missing")
        cases.append(Case(name, images, label))
    modality = str(channels[sorted(channels, key=int)[0]]).upper()
    labels = meta.get("labels")
    return Dataset(tuple(cases), "CT" if modality == "CT" else modality,
                   f"nnU-Net raw dataset {root} ({len(cases)} cases, {modality})", labels)


def _suffix(files: Sequence[Path]) -> str:
    return ".nii.gz" if files and files[0].name.endswith(".nii.gz") else ".nii"


def _largest_value(label: Path) -> int:
    try:
        return int(np.asanyarray(nib.load(label).dataobj).max())
    except Exception as error:  # nibabel raises several types for unreadable files
        raise DataError(f"label {label} cannot be read: {error}") from error


def _paired(root: Path, modality: str) -> Dataset:
    """``images/`` and ``labels/`` holding the same file names, one channel a case; the
    classes from a ``dataset.json`` beside them (``labels``) when there is one, else
    0..K-1 with K - 1 the largest value of the label maps."""
    files = sorted(p for p in (root / "images").iterdir() if _is_nifti(p))
    if not files:
        raise DataError(f"no .nii or .nii.gz volumes found in {root / 'images'}")
    cases = []
    for path in files:
        label = root / "labels" / path.name
        if not label.exists():
            raise DataError(f"case {_strip(path.name)!r} has no label file: {label} is missing")
        cases.append(Case(_strip(path.name), (path,), label))
    meta_path = root / "dataset.json"
    if meta_path.exists():
        labels, note = json.loads(meta_path.read_text()).get("labels"), ""
    else:
        largest = max(_largest_value(case.label) for case in cases)
        labels = {"background": 0, **{f"class_{k}": k for k in range(1, largest + 1)}}
        note = f"; {largest + 1} classes read off the label maps: no dataset.json"
    return Dataset(tuple(cases), modality.upper(), f"paired folders {root}/images and labels "
                   f"({len(cases)} cases, {modality}{note})", labels)


def discover(root: str | Path, *, modality: str = "CT", with_labels: bool = False) -> Dataset:
    """An nnU-Net raw dataset (``imagesTr/``, ``dataset.json``; ``labelsTr/`` when
    ``with_labels``); with labels also paired ``images/`` and ``labels/`` folders;
    without, any folder of ``.nii``/``.nii.gz`` volumes (searched recursively, one
    channel each)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    if (root / "imagesTr").is_dir():
        return _nnunet(root, with_labels)
    if with_labels:
        if (root / "images").is_dir() and (root / "labels").is_dir():
            return _paired(root, modality)
        raise DataError(f"{root} is neither an nnU-Net raw dataset (imagesTr/, labelsTr/, "
                        "dataset.json) nor paired images/ and labels/ folders: labels "
                        "cannot be paired")
    files = sorted(p for p in root.rglob("*") if _is_nifti(p))
    if not files:
        raise DataError(f"no .nii or .nii.gz volumes found in {root}")
    cases = tuple(Case(_strip(p.name), (p,)) for p in files)
    return Dataset(cases, modality.upper(), f"folder {root} ({len(cases)} volumes, {modality})")


class _NamedLoad(mt.LoadImaged):
    """LoadImaged whose read errors (a truncated .nii.gz, a foreign file) name the
    files instead of MONAI's "applying transform <LoadImaged object>"."""

    def __call__(self, data: dict, reader=None) -> dict:
        try:
            return super().__call__(data, reader)
        except Exception as error:  # nibabel / gzip / zlib raise several types
            files = ", ".join(str(data[key]) for key in self.keys if key in data)
            detail = " ".join(str(error).split()) or type(error).__name__
            raise DataError(f"{files}: cannot be read as NIfTI ({detail})") from None


class _Check3D(mt.MapTransform):
    """Rejects volumes that are not 3D or hold NaN / Inf (naming the file) and warns
    when one is smaller than the crop and will be padded."""

    def __init__(self, keys: Sequence[str], crop: Sequence[int]) -> None:
        super().__init__(keys)
        self.crop = tuple(crop)

    def __call__(self, data: dict) -> dict:
        for key in self.keys:
            image = data[key]
            source = image.meta.get("filename_or_obj", "?") if hasattr(image, "meta") else "?"
            if image.ndim != 4:
                raise DataError(f"{source}: expected a 3D volume, got spatial shape "
                                f"{tuple(image.shape[1:])}")
            bad = int((~torch.isfinite(image)).sum())
            if bad:
                raise DataError(f"{source}: {bad} of {image.numel()} voxels are NaN or "
                                "infinite; expected finite intensities")
            if any(s < c for s, c in zip(image.shape[1:], self.crop)):
                warnings.warn(f"{source}: shape {tuple(image.shape[1:])} is smaller than the "
                              f"crop {self.crop}; it is padded", stacklevel=2)
        return data


def preprocessing(dataset: Dataset, crop: Sequence[int],
                  spacing: Sequence[float] | None) -> mt.Compose:
    """Deterministic part: load, check, optional resampling, intensity normalization
    (CT: clip to the 0.5/99.5 percentiles then z-score; MR/PET: z-score), padding."""
    keys = ["image", "label"] if dataset.cases[0].label is not None else ["image"]
    # One loader a key, so that a read error names the one file that failed.
    steps: list = [*(_NamedLoad(key, reader="NibabelReader", ensure_channel_first=True,
                                image_only=True) for key in keys),
                   _Check3D(["image"], crop)]
    if len(dataset.cases[0].images) > 1:
        steps.insert(len(keys), mt.ConcatItemsd(["image"], "image"))
    if spacing is not None:
        modes = ["bilinear", "nearest"][: len(keys)]
        steps.append(mt.Spacingd(keys, pixdim=tuple(spacing), mode=modes))
    if dataset.modality == "CT":
        steps.append(mt.ClipIntensityPercentilesd(["image"], lower=0.5, upper=99.5,
                                                  channel_wise=True))
    steps += [mt.NormalizeIntensityd(["image"], channel_wise=True),
              mt.SpatialPadd(keys, spatial_size=tuple(crop)),
              mt.EnsureTyped(keys, dtype=[torch.float32, torch.int64][: len(keys)],
                             track_meta=False)]
    return mt.Compose(steps)


def augmentation(keys: Sequence[str], crop: Sequence[int], flips: bool,
                 foreground: float | None = None) -> mt.Compose:
    """Random part: a crop of the input size (with ``foreground``, that share of the
    crops centred on a labelled voxel, the others anywhere: nnU-Net's oversampling),
    and flips along each axis."""
    if foreground is None:
        steps: list = [mt.RandSpatialCropd(keys, roi_size=tuple(crop), random_size=False)]
    else:
        steps = [mt.RandCropByPosNegLabeld(keys, label_key="label", spatial_size=tuple(crop),
                                           pos=foreground, neg=1.0 - foreground, num_samples=1,
                                           allow_smaller=True)]
    if flips:
        steps += [mt.RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(3)]
    return mt.Compose(steps)


def _case_dict(case: Case) -> dict:
    item = {"image": [str(p) for p in case.images] if len(case.images) > 1 else str(case.images[0])}
    if case.label is not None:
        item["label"] = str(case.label)
    return item


def check_readable(dataset: Dataset) -> None:
    """Reads every file's NIfTI header, so that a corrupt or foreign file, or one that
    is not a 3D volume (4D: one file per channel is expected), is named before training
    starts (not deep inside a loader worker)."""
    for case in dataset.cases:
        for path in (*case.images, *([case.label] if case.label is not None else [])):
            try:
                shape = nib.load(path).header.get_data_shape()
            except Exception as error:  # nibabel raises several types for bad files
                raise DataError(f"{path}: cannot be read as NIfTI ({error})") from None
            if len(shape) < 3 or any(s != 1 for s in shape[3:]):
                raise DataError(f"{path}: expected a 3D volume, got shape {tuple(shape)} "
                                "(a 4D file is not a case: one file per channel)")


class CropDataset(torch.utils.data.Dataset):
    """Pre-processed volumes (cached in memory after the first load), cropped and
    augmented with randomness seeded by (seed, epoch, index). ``foreground``: the
    share of crops centred on a labelled voxel (needs labels)."""

    def __init__(self, dataset: Dataset, crop: Sequence[int], *, seed: int,
                 spacing: Sequence[float] | None = None, flips: bool = True,
                 cache: bool = True, foreground: float | None = None) -> None:
        check_readable(dataset)
        self.keys = ["image", "label"] if dataset.cases[0].label is not None else ["image"]
        data = [_case_dict(case) for case in dataset.cases]
        with _unwrapped_data_errors():
            self.volumes = CacheDataset(data, preprocessing(dataset, crop, spacing),
                                        cache_rate=1.0 if cache else 0.0, num_workers=0,
                                        progress=False)
        if foreground is not None and "label" not in self.keys:
            raise DataError("foreground oversampling needs label maps")
        self.random = augmentation(self.keys, crop, flips, foreground)
        self.names = [case.name for case in dataset.cases]
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> dict:
        self.random.set_random_state(seed=_mix(self.seed, self.epoch, index))
        with _unwrapped_data_errors():
            item = self.random(self.volumes[index])
        if isinstance(item, list):      # RandCropByPosNegLabeld's list of num_samples=1
            item = item[0]
        return {key: item[key].as_tensor() if hasattr(item[key], "as_tensor") else item[key]
                for key in self.keys}


@contextlib.contextmanager
def _unwrapped_data_errors() -> Iterator[None]:
    """MONAI wraps a transform's exception in RuntimeError("applying transform ...");
    a DataError (which names the file) is re-raised as itself."""
    try:
        yield
    except RuntimeError as error:
        cause = error.__cause__
        while isinstance(cause, RuntimeError) and not isinstance(cause, DataError):
            cause = cause.__cause__
        if isinstance(cause, DataError):
            raise cause from None
        raise


def _mix(*values: int) -> int:
    return int(np.random.SeedSequence(list(values)).generate_state(1)[0])


class ResumableSampler(torch.utils.data.Sampler[int]):
    """A seeded permutation per epoch, sharded across ranks (padded to equal length as
    DistributedSampler does), that can start part-way through an epoch."""

    def __init__(self, size: int, *, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.per_rank = math.ceil(size / world_size)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Epoch ``epoch``, skipping this rank's first ``start`` samples (resume)."""
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
        order = torch.randperm(self.size, generator=generator).tolist()
        order += order[: self.per_rank * self.world_size - self.size]
        return iter(order[self.rank::self.world_size][self.start:])

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start)


def epoch_loader(data: CropDataset, sampler: ResumableSampler, *, epoch: int, start_step: int,
                 batch_size: int, workers: int) -> torch.utils.data.DataLoader:
    """The loader of epoch ``epoch`` from step ``start_step`` on (a resumed run skips the
    samples already seen; augmentation is seeded by (seed, epoch, index)). An epoch of
    more steps than one pass holds restarts the pass (the training loops), so the step
    is taken modulo the batches of a pass (the last one may be short)."""
    batches_per_pass = math.ceil(sampler.per_rank / batch_size)
    sampler.set_epoch(epoch, start=start_step % batches_per_pass * batch_size)
    data.set_epoch(epoch)
    return _SignalSafeLoader(data, batch_size=batch_size, sampler=sampler, num_workers=workers,
                             worker_init_fn=_worker_signals)


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

"""Raw datasets: discovery (a folder of NIfTI files, an nnU-Net raw dataset, paired
images/ and labels/ folders) and the MONAI pre-processing of whole volumes that
prediction uses. Training reads a pre-processed store instead (``store``,
``volumes``, ``sampling``)."""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai import transforms as mt

NIFTI_SUFFIXES = (".nii", ".nii.gz")
MODALITIES = ("CT", "MR", "PET")


class DataError(ValueError):
    """A dataset that cannot be used, with the file or folder named."""


def check_modality(modality: str) -> str:
    """``modality`` upper-cased; a DataError unless it is CT, MR or PET (it picks the
    normalization: a forgotten or misspelt flag must not CT-clip MR data)."""
    if str(modality).upper() not in MODALITIES:
        raise DataError(f"--modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    return str(modality).upper()


@dataclass(frozen=True)
class Case:
    name: str
    images: tuple[Path, ...]  # one file per channel
    label: Path | None = None


@dataclass(frozen=True)
class Dataset:
    cases: tuple[Case, ...]
    modality: str  # "CT", "MR" or "PET": picks the normalization
    description: str
    labels: dict[str, int] | None = None


def phantom_root(out: Path, runtime, *, cases: int, seed: int) -> Path:
    """The embedded phantom's folder, written by rank 0 under ``out/data`` while the
    other ranks wait."""
    from .phantom import write_phantom_dataset

    root = write_phantom_dataset(out / "data", cases=cases, seed=seed) if runtime.main else None
    if runtime.distributed:
        torch.distributed.barrier()
        root = next((out / "data").glob("phantom_*"))
    return root


def job_dataset(
    data: str | None,
    out: Path,
    runtime,
    *,
    modality: str,
    phantom_cases: int,
    seed: int,
    with_labels: bool = False,
) -> Dataset:
    """The raw dataset of a training job: ``data`` discovered, or the embedded phantom."""
    root = data if data is not None else phantom_root(out, runtime, cases=phantom_cases, seed=seed)
    return discover(root, modality=modality, with_labels=with_labels)


def _is_nifti(path: Path) -> bool:
    return path.is_file() and path.name.endswith(NIFTI_SUFFIXES)


def strip_suffix(name: str) -> str:
    return name[:-7] if name.endswith(".nii.gz") else name[:-4]


def _nnunet(root: Path, with_labels: bool) -> Dataset:
    meta_path = root / "dataset.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    channels = meta.get("channel_names") or meta.get("modality") or {"0": "CT"}
    files = sorted(p for p in (root / "imagesTr").iterdir() if _is_nifti(p))
    names = sorted({strip_suffix(p.name)[:-5] for p in files if strip_suffix(p.name)[-5:-4] == "_"})
    if not names:
        raise DataError(f"no nnU-Net images (CASE_0000.nii.gz) found in {root / 'imagesTr'}")
    cases = []
    for name in names:
        images = tuple(
            root / "imagesTr" / f"{name}_{int(c):04d}{_suffix(files)}"
            for c in sorted(channels, key=int)
        )
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
    return Dataset(
        tuple(cases),
        "CT" if modality == "CT" else modality,
        f"nnU-Net raw dataset {root} ({len(cases)} cases, {modality})",
        labels,
    )


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
            raise DataError(
                f"case {strip_suffix(path.name)!r} has no label file: {label} is missing"
            )
        cases.append(Case(strip_suffix(path.name), (path,), label))
    meta_path = root / "dataset.json"
    if meta_path.exists():
        labels, note = json.loads(meta_path.read_text()).get("labels"), ""
    else:
        largest = max(_largest_value(case.label) for case in cases)
        labels = {"background": 0, **{f"class_{k}": k for k in range(1, largest + 1)}}
        note = f"; {largest + 1} classes read off the label maps: no dataset.json"
    return Dataset(
        tuple(cases),
        check_modality(modality),
        f"paired folders {root}/images and labels ({len(cases)} cases, {modality}{note})",
        labels,
    )


def discover(root: str | Path, *, modality: str = "CT", with_labels: bool = False) -> Dataset:
    """An nnU-Net raw dataset (``imagesTr/``, ``dataset.json``; ``labelsTr/`` when
    ``with_labels``); with labels also paired ``images/`` and ``labels/`` folders;
    without, any folder of ``.nii``/``.nii.gz`` volumes (searched recursively, one
    channel each)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    check_modality(modality)
    if (root / "imagesTr").is_dir():
        return _nnunet(root, with_labels)
    if with_labels:
        if (root / "images").is_dir() and (root / "labels").is_dir():
            return _paired(root, modality)
        raise DataError(
            f"{root} is neither an nnU-Net raw dataset (imagesTr/, labelsTr/, "
            "dataset.json) nor paired images/ and labels/ folders: labels "
            "cannot be paired"
        )
    files = sorted(p for p in root.rglob("*") if _is_nifti(p))
    if not files:
        raise DataError(f"no .nii or .nii.gz volumes found in {root}")
    cases = tuple(Case(strip_suffix(p.name), (p,)) for p in files)
    return Dataset(
        cases, check_modality(modality), f"folder {root} ({len(cases)} volumes, {modality})"
    )


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


def refuse_nonfinite(source, bad: int, total: int) -> None:
    """A DataError naming ``source`` when ``bad`` of its ``total`` voxels are NaN or Inf."""
    if bad:
        raise DataError(
            f"{source}: {bad} of {total} voxels are NaN or infinite; expected finite intensities"
        )


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
                raise DataError(
                    f"{source}: expected a 3D volume, got spatial shape {tuple(image.shape[1:])}"
                )
            refuse_nonfinite(source, int((~torch.isfinite(image)).sum()), image.numel())
            if any(s < c for s, c in zip(image.shape[1:], self.crop)):
                warnings.warn(
                    f"{source}: shape {tuple(image.shape[1:])} is smaller than the "
                    f"crop {self.crop}; it is padded",
                    stacklevel=2,
                )
        return data


def preprocessing(
    dataset: Dataset,
    crop: Sequence[int],
    spacing: Sequence[float] | None,
    normalization: dict | None = None,
) -> mt.Compose:
    """Deterministic part: load, check, optional resampling, intensity normalization,
    padding. ``normalization`` (``Volumes.normalization``, saved by fine-tuning): with
    the scheme ``dataset``, the store's dataset-wide CT clip bounds, mean and std; else
    per volume (CT: clip to the 0.5/99.5 percentiles then z-score; MR/PET: z-score)."""
    keys = ["image", "label"] if dataset.cases[0].label is not None else ["image"]
    # One loader a key, so that a read error names the one file that failed.
    steps: list = [
        *(
            _NamedLoad(key, reader="NibabelReader", ensure_channel_first=True, image_only=True)
            for key in keys
        ),
        _Check3D(["image"], crop),
    ]
    if len(dataset.cases[0].images) > 1:
        steps.insert(len(keys), mt.ConcatItemsd(["image"], "image"))
    if spacing is not None:
        modes = ["bilinear", "nearest"][: len(keys)]
        steps.append(mt.Spacingd(keys, pixdim=tuple(spacing), mode=modes))
    if normalization is not None and normalization.get("scheme") == "dataset":
        steps.append(
            mt.Lambdad(["image"], lambda x: _fixed_normalization(x, normalization["channels"]))
        )
    else:
        if dataset.modality == "CT":
            steps.append(
                mt.ClipIntensityPercentilesd(["image"], lower=0.5, upper=99.5, channel_wise=True)
            )
        steps.append(mt.NormalizeIntensityd(["image"], channel_wise=True))
    steps += [
        mt.SpatialPadd(keys, spatial_size=tuple(crop)),
        mt.EnsureTyped(keys, dtype=[torch.float32, torch.int64][: len(keys)], track_meta=False),
    ]
    return mt.Compose(steps)


def _fixed_normalization(image: torch.Tensor, channels: Sequence[dict]) -> torch.Tensor:
    """Clip and z-score each channel with given statistics (the store's, on reading)."""
    out = image.float().clone()
    for c, stats in enumerate(channels):
        out[c] = (out[c].clamp(stats["lower"], stats["upper"]) - stats["mean"]) / max(
            stats["std"], 1e-8
        )
    return out


def case_dict(case: Case) -> dict:
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
                raise DataError(
                    f"{path}: expected a 3D volume, got shape {tuple(shape)} "
                    "(a 4D file is not a case: one file per channel)"
                )


@contextlib.contextmanager
def unwrapped_data_errors() -> Iterator[None]:
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

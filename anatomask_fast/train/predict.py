"""``python -m anatomask_fast.train predict``: label maps for a folder of volumes, with
the training pre-processing and sliding-window inference (Gaussian weighting,
``inference``), written as NIfTI with each input's affine and header."""

from __future__ import annotations

import gzip
import re
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from ..models.networks import spec_of
from . import checkpoint as ckpt
from .config import PredictConfig
from .config import check as check_config
from .data import (
    NIFTI_SUFFIXES,
    Case,
    DataError,
    Dataset,
    case_dict,
    check_readable,
    preprocessing,
    strip_suffix,
    unwrapped_data_errors,
)
from .inference import class_list, infer, load_model, mirrorings, restore_grid, window_count
from .progress import progress_bar
from .runtime import setup


def input_files(inputs: Sequence[str | Path]) -> list[Path]:
    """The volumes named by ``--input``: files (.nii, .nii.gz), and the volumes of
    folders (not searched below), in the order given, each once."""
    files: list[Path] = []
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            found = sorted(
                p for p in path.iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES)
            )
            if not found:
                raise DataError(f"--input {path}: the folder holds no .nii or .nii.gz volume")
            files += found
        elif path.is_file():
            if not path.name.endswith(NIFTI_SUFFIXES):
                raise DataError(f"--input {path}: not a .nii or .nii.gz file")
            files.append(path)
        else:
            raise DataError(f"--input {path}: no such file or folder")
    unique = {p.resolve(): p for p in files}
    return list(unique.values())


def cases_of(files: Sequence[Path], in_channels: int) -> list[Case]:
    """Cases of input volumes: one file per case, or nnU-Net names CASE_XXXX per
    channel (files from different folders with one case name are refused)."""
    groups: dict[str, list[Path]] = {}
    for path in files:
        stem = strip_suffix(path.name)
        match = re.fullmatch(r"(.+)_(\d{4})", stem)
        groups.setdefault(match.group(1) if match else stem, []).append(path)
    for path in files:  # a 4D file would load as channels and fail in the network
        shape = nib.load(path).header.get_data_shape()
        if len(shape) != 3:
            raise DataError(
                f"{path}: expected a 3D volume, got shape {shape} "
                f"({len(shape)}D); split the channels into CASE_XXXX files"
            )
    cases = []
    for name, paths in groups.items():
        if len({p.name for p in paths}) < len(paths):
            raise DataError(
                f"case {name!r} is given twice ({', '.join(map(str, paths))}): "
                "its label map would be written over"
            )
        if len(paths) != in_channels:
            raise DataError(
                f"case {name!r} has {len(paths)} channel file(s) "
                f"({', '.join(p.name for p in paths)}); the model takes "
                f"{in_channels} (nnU-Net names: {name}_0000 ...)"
            )
        cases.append(Case(name, tuple(sorted(paths))))
    return cases


def run(config: PredictConfig) -> list[Path]:
    check_config(config)
    inputs = (config.input,) if isinstance(config.input, (str, Path)) else config.input
    files = input_files(inputs)
    runtime = setup(config.device)
    model, meta = load_model(config.checkpoint, runtime.device)
    cases = cases_of(files, meta["in_channels"])
    dataset = Dataset(tuple(cases), meta["modality"], f"--input {' '.join(map(str, inputs))}")
    check_readable(dataset)
    transform = preprocessing(dataset, meta["crop"], meta["spacing"], meta.get("normalization"))
    out = Path(config.output)  # created with the first label map (none on failure)
    written = []
    mirror_axes = (meta.get("inference_allowed_mirroring_axes") or ()) if config.mirroring else ()
    passes = len(mirrorings(mirror_axes))
    print(
        f"anatomask_fast predict: {len(cases)} case(s) from {' '.join(map(str, inputs))}, "
        f"{spec_of(meta).describe()} ({meta['num_classes']} classes: "
        f"{class_list(meta.get('labels'), meta['num_classes'])}) from {config.checkpoint}, "
        f"test-time mirroring over axes {tuple(mirror_axes) or 'none'} ({passes} network "
        f"pass(es) per window)"
    )
    for number, case in enumerate(cases, 1):
        reference = nib.load(case.images[0])
        with unwrapped_data_errors():
            item = transform(case_dict(case))
        image = item["image"][None].to(runtime.device)
        windows = window_count(image.shape[2:], meta["crop"], config.overlap)
        with progress_bar(
            windows, f"predict {number}/{len(cases)} {case.name}", "window", leave=False
        ) as bar:
            logits = infer(
                model,
                image,
                tuple(meta["crop"]),
                overlap=config.overlap,
                amp=config.amp,
                mirror_axes=mirror_axes,
                progress=bar,
            )
        labels = restore_grid(logits, reference.shape[:3], meta["spacing"] is not None).argmax(1)[0]
        header = reference.header.copy()
        header.set_data_dtype(np.uint8 if meta["num_classes"] < 256 else np.int16)
        path = out / f"{case.name}.nii.gz"
        result = nib.Nifti1Image(
            labels.cpu().numpy().astype(header.get_data_dtype()), reference.affine, header
        )
        # Written whole or not at all (a full disk leaves no truncated label map).
        ckpt.atomic_write_bytes(gzip.compress(result.to_bytes(), compresslevel=1, mtime=0), path)
        written.append(path)
        print(f"  {number}/{len(cases)} {case.name}: {path}")
    print(
        f"  done: {len(written)} label map(s) in {out}/ (voxel values: "
        f"{class_list(meta.get('labels'), meta['num_classes'])})"
    )
    print(
        "  next: how the pretraining's anatomical mask follows anatomy: python -m "
        "anatomask_fast.train guidance --checkpoint PRETRAINING_RUN/checkpoint_latest.pt "
        "--data LABELLED_DATASET (runs/pretrain for the demonstration)"
    )
    return written

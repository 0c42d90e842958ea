"""``python -m anatomask_fast.train predict``: label maps for a folder of volumes, with
the training pre-processing and sliding-window inference (Gaussian weighting,
``inference``), written as NIfTI with each input's affine and header."""
from __future__ import annotations

import gzip
import re
from pathlib import Path

import nibabel as nib
import numpy as np

from . import checkpoint as ckpt
from .config import PredictConfig
from .data import (NIFTI_SUFFIXES, Case, DataError, Dataset, case_dict, check_readable,
                   preprocessing, strip_suffix, unwrapped_data_errors)
from .inference import infer, load_model, restore_grid
from .runtime import setup

def _cases(folder: Path, in_channels: int) -> list[Case]:
    """Input volumes: one file per case, or nnU-Net names CASE_XXXX per channel."""
    if not folder.is_dir():
        raise DataError(f"input folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))
    if not files:
        raise DataError(f"no .nii or .nii.gz volumes found in {folder}")
    groups: dict[str, list[Path]] = {}
    for path in files:
        stem = strip_suffix(path.name)
        match = re.fullmatch(r"(.+)_(\d{4})", stem)
        groups.setdefault(match.group(1) if match else stem, []).append(path)
    for path in files:       # a 4D file would load as channels and fail in the network
        shape = nib.load(path).header.get_data_shape()
        if len(shape) != 3:
            raise DataError(f"{path}: expected a 3D volume, got shape {shape} "
                            f"({len(shape)}D); split the channels into CASE_XXXX files")
    cases = []
    for name, paths in groups.items():
        if len(paths) != in_channels:
            raise DataError(f"case {name!r} in {folder} has {len(paths)} channel file(s), "
                            f"the model takes {in_channels}")
        cases.append(Case(name, tuple(paths)))
    return cases


def run(config: PredictConfig) -> list[Path]:
    if not config.input:
        raise ValueError("predict needs --input (a folder of volumes)")
    runtime = setup(config.device)
    model, meta = load_model(config.checkpoint, runtime.device)
    cases = _cases(Path(config.input), meta["in_channels"])
    dataset = Dataset(tuple(cases), meta["modality"], f"folder {config.input}")
    check_readable(dataset)
    transform = preprocessing(dataset, meta["crop"], meta["spacing"], meta.get("normalization"))
    out = Path(config.output)          # created with the first label map (none on failure)
    written = []
    mirror_axes = (meta.get("inference_allowed_mirroring_axes") or ()) if config.mirroring else ()
    print(f"anatomask_fast predict: {len(cases)} case(s) from {config.input}, STU-Net-"
          f"{meta['size']} ({meta['num_classes']} classes) from {config.checkpoint}, "
          f"test-time mirroring over axes {tuple(mirror_axes) or 'none'}")
    for case in cases:
        reference = nib.load(case.images[0])
        with unwrapped_data_errors():
            item = transform(case_dict(case))
        logits = infer(model, item["image"][None].to(runtime.device), tuple(meta["crop"]),
                       overlap=config.overlap, amp=config.amp, mirror_axes=mirror_axes)
        labels = restore_grid(logits, reference.shape[:3], meta["spacing"] is not None).argmax(1)[0]
        header = reference.header.copy()
        header.set_data_dtype(np.uint8 if meta["num_classes"] < 256 else np.int16)
        path = out / f"{case.name}.nii.gz"
        result = nib.Nifti1Image(labels.cpu().numpy().astype(header.get_data_dtype()),
                                 reference.affine, header)
        # Written whole or not at all (a full disk leaves no truncated label map).
        ckpt.atomic_write_bytes(gzip.compress(result.to_bytes(), compresslevel=1, mtime=0),
                                path)
        written.append(path)
        print(f"  {case.name}: {path}")
    return written

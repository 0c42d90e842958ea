"""``python -m anatomask_fast.train predict``: label maps for a folder of volumes, with
the training pre-processing and sliding-window inference (Gaussian weighting), written
as NIfTI with each input's affine and header. Also the inference and overlay helpers
the fine-tuning validation uses."""
from __future__ import annotations

import gzip
import itertools
import re
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

from ..models.networks import spec_of
from ..models.resenc import ResidualEncoderUNet
from ..models.segmentation import STUNet
from . import checkpoint as ckpt
from .config import PredictConfig
from .data import NIFTI_SUFFIXES, Case, DataError, Dataset, _case_dict, _strip, \
    _unwrapped_data_errors, check_readable, preprocessing
from .previews import _gray
from .runtime import autocast, setup

COLORS = np.array([[0, 0, 0], [230, 60, 60], [60, 200, 80], [70, 120, 240], [240, 200, 40],
                   [200, 80, 220], [40, 210, 220], [250, 140, 40]], dtype=np.float32)


def mirrorings(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of the spatial ``axes`` (0, 1, 2), the empty one first: nnU-Net's
    test-time mirroring averages the logits of the window flipped along each."""
    chosen = sorted(set(axes))
    if not set(chosen) <= {0, 1, 2}:
        raise ValueError(f"mirroring axes must be among (0, 1, 2), got {tuple(axes)}")
    return [c for r in range(len(chosen) + 1) for c in itertools.combinations(chosen, r)]


def infer(model: STUNet, image: torch.Tensor, roi: tuple[int, ...], *, overlap: float = 0.5,
          amp: str = "none", mirror_axes: Sequence[int] = ()) -> torch.Tensor:
    """Class logits (B, K, ...) of ``image`` (B, C, ...) by MONAI's sliding-window
    inference with Gaussian weighting, the model in eval mode, highest-resolution head
    only; with ``mirror_axes``, each window's logits averaged over its flips along
    every subset of those spatial axes (nnU-Net's test-time mirroring)."""

    model.eval()
    deep, model.deep_supervision = model.deep_supervision, False
    flips = mirrorings(mirror_axes)

    def predictor(window: torch.Tensor) -> torch.Tensor:
        total = None
        for axes in flips:
            dims = [a + 2 for a in axes]
            with autocast(window.device, amp):
                logits = model(window.flip(dims) if dims else window).float()
            logits = logits.flip(dims) if dims else logits
            total = logits if total is None else total.add_(logits)
        return total / len(flips)

    try:
        with torch.no_grad():
            return sliding_window_inference(image, tuple(roi), sw_batch_size=2,
                                            predictor=predictor, overlap=overlap,
                                            mode="gaussian")
    finally:
        model.deep_supervision = deep


def overlay(path: Path, image: torch.Tensor, label: torch.Tensor | None,
            prediction: torch.Tensor) -> Path:
    """PNG: image | ground truth | prediction on the axial slice (last axis) with the
    most labelled voxels, classes in colour over the image."""
    from PIL import Image

    reference = label if label is not None else prediction
    depth = int((reference > 0).flatten(0, 1).sum(0).argmax())
    gray = _gray(image[:, :, depth].float().cpu().numpy()).astype(np.float32)

    def colored(classes: torch.Tensor) -> np.ndarray:
        ids = classes[:, :, depth].cpu().numpy() % len(COLORS)
        mixed = np.where((ids > 0)[..., None], 0.45 * gray + 0.55 * COLORS[ids], gray)
        return mixed.astype(np.uint8)

    gap = np.full((gray.shape[0], 4, 3), 255, dtype=np.uint8)
    panels = [gray.astype(np.uint8), gap]
    if label is not None:
        panels += [colored(label), gap]
    panel = np.concatenate(panels + [colored(prediction)], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(panel).resize((panel.shape[1] * 3, panel.shape[0] * 3),
                                  Image.NEAREST).save(path)
    return path


def load_model(path: str | Path, device: torch.device
               ) -> tuple[STUNet | ResidualEncoderUNet, dict]:
    """The fine-tuned network of a checkpoint (best or latest: STU-Net or a
    ResidualEncoderUNet) and its metadata; a ValueError naming the file when it does
    not hold a segmentation model that fits."""
    saved = ckpt.load(path)
    from .finetune import FORMAT

    if saved.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path} is not a fine-tuned segmentation model "
                         f"(format {saved.get('format')!r}, expected {FORMAT!r})")
    spec = spec_of(saved)
    model = STUNet(saved["size"], saved["in_channels"], saved["num_classes"],
                   strides=saved.get("strides"), kernels=saved.get("kernels"),
                   deep_supervision=False, checkpointing=False) if spec.is_stunet else \
        ResidualEncoderUNet(spec.arch, saved["in_channels"], saved["num_classes"],
                            deep_supervision=False)
    try:
        model.load_state_dict(saved["network_weights"])
    except RuntimeError as error:
        first = str(error).splitlines()[1:3]
        raise ValueError(f"checkpoint {path} does not fit {spec.describe()} with "
                         f"{saved['num_classes']} classes: {' '.join(first).strip()}") from None
    return model.to(device), saved


def _cases(folder: Path, in_channels: int) -> list[Case]:
    """Input volumes: one file per case, or nnU-Net names CASE_XXXX per channel."""
    if not folder.is_dir():
        raise DataError(f"input folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))
    if not files:
        raise DataError(f"no .nii or .nii.gz volumes found in {folder}")
    groups: dict[str, list[Path]] = {}
    for path in files:
        stem = _strip(path.name)
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


def _restore_grid(logits: torch.Tensor, shape: tuple[int, ...], resampled: bool) -> torch.Tensor:
    """Undo the pre-processing's geometry: the resampling (trilinear on the logits), or
    the symmetric padding up to the crop size."""
    if resampled:
        return F.interpolate(logits, size=shape, mode="trilinear", align_corners=False)
    start = [(p - s) // 2 for s, p in zip(shape, logits.shape[2:])]
    return logits[:, :, start[0]:start[0] + shape[0], start[1]:start[1] + shape[1],
                  start[2]:start[2] + shape[2]]


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
    print(f"anatomask_fast predict: {len(cases)} case(s) from {config.input}, "
          f"{spec_of(meta).describe()} ({meta['num_classes']} classes) from {config.checkpoint}, "
          f"test-time mirroring over axes {tuple(mirror_axes) or 'none'}")
    for case in cases:
        reference = nib.load(case.images[0])
        with _unwrapped_data_errors():
            item = transform(_case_dict(case))
        logits = infer(model, item["image"][None].to(runtime.device), tuple(meta["crop"]),
                       overlap=config.overlap, amp=config.amp, mirror_axes=mirror_axes)
        labels = _restore_grid(logits, reference.shape[:3], meta["spacing"] is not None).argmax(1)[0]
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

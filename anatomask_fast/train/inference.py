"""Segmentation inference, in one place for fine-tuning's validation and ``predict``
(as nnU-Net's ``nnUNetPredictor`` serves both): the fine-tuned model from its
checkpoint, sliding-window inference with Gaussian weighting and test-time mirroring,
the inverse of the pre-processing's geometry, and overlay figures. Imports neither
``finetune`` nor ``predict``."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

from ..models.networks import spec_of
from ..models.resenc import ResidualEncoderUNet
from ..models.segmentation import STUNet
from . import checkpoint as ckpt
from .previews import gray, save_figure, window
from .step import autocast

# The checkpoint format fine-tuning writes and inference reads.
SEGMENTATION_FORMAT = "anatomask_fast.segmentation/2"

COLORS = np.array(
    [
        [0, 0, 0],
        [230, 60, 60],
        [60, 200, 80],
        [70, 120, 240],
        [240, 200, 40],
        [200, 80, 220],
        [40, 210, 220],
        [250, 140, 40],
    ],
    dtype=np.float32,
)


def class_names(labels: dict | None, classes: int) -> list[str]:
    """Names of the classes 0..K-1 from ``dataset.json``'s ``labels`` (name -> value);
    ``class k`` where it names none."""
    named = {
        int(v): name
        for name, v in (labels or {}).items()
        if isinstance(v, int) or (isinstance(v, str) and v.isdigit())
    }
    return [named.get(k, f"class {k}") for k in range(classes)]


def class_list(labels: dict | None, classes: int) -> str:
    """``0 background, 1 liver, ...``: what each voxel value of a label map means."""
    return ", ".join(f"{k} {name}" for k, name in enumerate(class_names(labels, classes)))


def mirrorings(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of the spatial ``axes`` (0, 1, 2), the empty one first: nnU-Net's
    test-time mirroring averages the logits of the window flipped along each."""
    chosen = sorted(set(axes))
    if not set(chosen) <= {0, 1, 2}:
        raise ValueError(f"mirroring axes must be among (0, 1, 2), got {tuple(axes)}")
    return [c for r in range(len(chosen) + 1) for c in itertools.combinations(chosen, r)]


def window_count(shape: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """How many windows MONAI's sliding window visits in a volume of spatial ``shape``:
    per axis, steps of ``int(roi * (1 - overlap))`` (at least 1) until a window reaches
    the end; one where the volume is no larger than the window."""
    count = 1
    for size, edge in zip(shape, roi):
        step = max(1, int(edge * (1 - overlap)))
        count *= 1 if size <= edge else math.ceil((size - edge) / step) + 1
    return count


def infer(
    model: STUNet,
    image: torch.Tensor,
    roi: tuple[int, ...],
    *,
    overlap: float = 0.5,
    amp: str = "none",
    mirror_axes: Sequence[int] = (),
    progress: Any = None,
) -> torch.Tensor:
    """Class logits (B, K, ...) of ``image`` (B, C, ...) by MONAI's sliding-window
    inference with Gaussian weighting, the model in eval mode, highest-resolution head
    only; with ``mirror_axes``, each window's logits averaged over its flips along
    every subset of those spatial axes (nnU-Net's test-time mirroring). ``progress``
    (a tqdm bar) is advanced by the windows done (:func:`window_count` in all)."""

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
        if progress is not None:
            progress.update(window.shape[0])
        return total / len(flips)

    try:
        with torch.no_grad():
            return sliding_window_inference(
                image,
                tuple(roi),
                sw_batch_size=2,
                predictor=predictor,
                overlap=overlap,
                mode="gaussian",
            )
    finally:
        model.deep_supervision = deep


def restore_grid(logits: torch.Tensor, shape: tuple[int, ...], resampled: bool) -> torch.Tensor:
    """Undo the pre-processing's geometry: the resampling (trilinear on the logits), or
    the symmetric padding up to the crop size."""
    if resampled:
        return F.interpolate(logits, size=shape, mode="trilinear", align_corners=False)
    start = [(p - s) // 2 for s, p in zip(shape, logits.shape[2:])]
    return logits[
        :,
        :,
        start[0] : start[0] + shape[0],
        start[1] : start[1] + shape[1],
        start[2] : start[2] + shape[2],
    ]


def load_model(path: str | Path, device: torch.device) -> tuple[STUNet | ResidualEncoderUNet, dict]:
    """The fine-tuned network of a checkpoint (best or latest: STU-Net or a
    ResidualEncoderUNet) and its metadata; a ValueError naming the file when it does
    not hold a segmentation model that fits."""
    saved = ckpt.load(path)
    if saved.get("format") != SEGMENTATION_FORMAT:
        raise ValueError(
            f"checkpoint {path} is not a fine-tuned segmentation model "
            f"(format {saved.get('format')!r}, expected {SEGMENTATION_FORMAT!r})"
        )
    spec = spec_of(saved)
    model = (
        STUNet(
            saved["size"],
            saved["in_channels"],
            saved["num_classes"],
            strides=saved.get("strides"),
            kernels=saved.get("kernels"),
            deep_supervision=False,
            checkpointing=False,
        )
        if spec.is_stunet
        else ResidualEncoderUNet(
            spec.arch, saved["in_channels"], saved["num_classes"], deep_supervision=False
        )
    )
    try:
        model.load_state_dict(saved["network_weights"])
    except RuntimeError as error:
        first = str(error).splitlines()[1:3]
        raise ValueError(
            f"checkpoint {path} does not fit {spec.describe()} with "
            f"{saved['num_classes']} classes: {' '.join(first).strip()}"
        ) from None
    return model.to(device), saved


def overlay(
    path: Path,
    image: torch.Tensor,
    label: torch.Tensor | None,
    prediction: torch.Tensor,
    *,
    title: str,
    names: Sequence[str],
) -> Path:
    """PNG: image | ground truth | prediction on the axial slice (last axis) with the
    most labelled voxels, classes in colour over the image, a legend with the class
    ``names`` (index = voxel value) and the image's intensity bar, under ``title``."""
    reference = label if label is not None else prediction
    depth = int((reference > 0).flatten(0, 1).sum(0).argmax())
    slice2d = image[:, :, depth].float().cpu().numpy()
    shown = window(slice2d)
    base = gray(slice2d, shown).astype(np.float32)

    def colored(classes: torch.Tensor) -> np.ndarray:
        ids = classes[:, :, depth].cpu().numpy() % len(COLORS)
        mixed = np.where((ids > 0)[..., None], 0.45 * base + 0.55 * COLORS[ids], base)
        return mixed.astype(np.uint8)

    panels = [("image", base.astype(np.uint8))]
    if label is not None:
        panels.append(("ground truth", colored(label)))
    panels.append(("prediction", colored(prediction)))
    legend = [(COLORS[k % len(COLORS)], name) for k, name in enumerate(names) if k > 0]
    return save_figure(
        path,
        panels,
        f"{title}; slice {depth} of the last axis",
        legend=legend,
        colorbar=(*shown, "normalized intensity"),
    )

"""A procedural CT-like phantom, written at run time as an nnU-Net raw dataset
(imagesTr/, labelsTr/, dataset.json), so that the embedded default runs through the
same loading code as real data.

Each case is a body ellipsoid of soft tissue under a subcutaneous fat layer, with
organ-like ellipsoids (a liver-like lobe, two kidneys in perirenal fat, a spleen) and a
spine-like bright cylinder, smooth texture and noise, at a random pose and size; labels
mark the organs. Intensities are those of a portal-venous contrast-enhanced abdominal
CT (Hounsfield units: fat about -100, muscle / soft tissue 50, liver 105, spleen 125,
kidney cortex 170, bone 400), the phase most abdominal segmentation datasets use.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

LABELS = {"background": 0, "liver": 1, "kidney": 2, "spleen": 3}
SHAPE = (96, 96, 80)
SPACING = (1.5, 1.5, 2.0)
VERSION = 3


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], scale: int) -> np.ndarray:
    """Band-limited texture: coarse Gaussian noise, trilinearly upsampled."""
    import torch

    coarse = torch.from_numpy(rng.standard_normal(tuple(s // scale + 2 for s in shape)))
    fine = torch.nn.functional.interpolate(
        coarse[None, None].float(), size=shape, mode="trilinear", align_corners=False
    )[0, 0]
    return (fine / (fine.std() + 1e-6)).numpy()


def _ellipsoid(grid: np.ndarray, center, radii) -> np.ndarray:
    return sum(((grid[i] - center[i]) / radii[i]) ** 2 for i in range(3)) <= 1.0


def make_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One (image in Hounsfield-like units, uint8 label map) pair."""
    rng = np.random.default_rng(seed)
    grid = np.indices(SHAPE, dtype=np.float32)
    center = np.array(SHAPE, dtype=np.float32) / 2 + rng.uniform(-4, 4, 3)
    scale = rng.uniform(0.85, 1.1)
    image = np.full(SHAPE, -1000.0, dtype=np.float32)  # air
    label = np.zeros(SHAPE, dtype=np.uint8)
    radii = np.array([40, 30, 38]) * scale
    body = _ellipsoid(grid, center, radii)
    image[body] = -100.0 + 20.0 * _smooth_noise(rng, SHAPE, 8)[body]  # fat
    inner = _ellipsoid(grid, center, radii - rng.uniform(2.5, 4.0))
    image[inner] = 50.0 + 15.0 * _smooth_noise(rng, SHAPE, 8)[inner]  # soft tissue
    organs = [
        ("liver", (-12, -6, 4), (20, 15, 17), 105.0),
        ("kidney", (8, 15, -8), (7, 6, 11), 170.0),
        ("kidney", (8, -15, -8), (7, 6, 11), 170.0),
        ("spleen", (-8, 19, 8), (9, 8, 11), 125.0),
    ]
    for name, offset, organ_radii, hu in organs:
        jitter = rng.uniform(-2, 2, 3)
        where = center + (np.array(offset) + jitter) * scale
        size = np.array(organ_radii) * scale * rng.uniform(0.9, 1.1, 3)
        if name == "kidney":  # perirenal fat around the kidney
            image[_ellipsoid(grid, where, size + 3) & inner] = -90.0
        region = _ellipsoid(grid, where, size) & inner
        image[region] = hu + 10.0 * _smooth_noise(rng, SHAPE, 4)[region]
        label[region] = LABELS[name]
    spine = (
        ((grid[0] - center[0] - 18 * scale) / 5) ** 2 + ((grid[1] - center[1]) / 5) ** 2 <= 1.0
    ) & inner
    image[spine] = 400.0 + 50.0 * rng.standard_normal(int(spine.sum()))
    image += 8.0 * rng.standard_normal(SHAPE).astype(np.float32)  # scanner noise
    return image, label


def write_phantom_dataset(root: Path, cases: int = 8, seed: int = 0) -> Path:
    """Writes (or reuses) the phantom dataset under ``root``; returns its folder."""
    import nibabel as nib

    folder = Path(root) / f"phantom_v{VERSION}_n{cases}_s{seed}"
    if (folder / "dataset.json").exists():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    (partial / "imagesTr").mkdir(parents=True, exist_ok=True)
    (partial / "labelsTr").mkdir(parents=True, exist_ok=True)
    affine = np.diag([*SPACING, 1.0])
    for index in range(cases):
        image, label = make_case(seed * 100_003 + index)
        name = f"phantom_{index:03d}"
        nib.save(nib.Nifti1Image(image, affine), partial / "imagesTr" / f"{name}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), partial / "labelsTr" / f"{name}.nii.gz")
    (partial / "dataset.json").write_text(
        json.dumps(
            {
                "name": "AnatoMaskPhantom",
                "description": "procedural CT-like phantom (anatomask_fast)",
                "channel_names": {"0": "CT"},
                "labels": LABELS,
                "numTraining": cases,
                "file_ending": ".nii.gz",
            },
            indent=2,
        )
    )
    partial.rename(folder)
    return folder

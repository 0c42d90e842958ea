"""Training augmentation, every draw from the sample's own ``numpy`` Generator (a pure
function of (seed, rank, epoch, step, sample)), on one (C, X, Y, Z) crop.

``nnunet``: nnU-Net v2's default training transforms with its probabilities and
ranges: rotation (p 0.2, +-30 degrees about each axis) and scaling (p 0.2, 0.7-1.4),
Gaussian noise (p 0.1, variance 0-0.1), Gaussian blur (p 0.2, sigma 0.5-1, each
channel p 0.5), brightness (p 0.15, x 0.75-1.25), contrast (p 0.15, 0.75-1.25, range
kept), low resolution (p 0.25, zoom 0.5-1, each channel p 0.5), gamma (inverted p 0.1,
then p 0.3; 0.7-1.5, statistics kept) and mirroring (p 0.5 per axis).
``light``: mirroring only. ``none``: nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

MODES = ("nnunet", "light", "none")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"--augmentation must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def spatial_matrix(rng: np.random.Generator, mode: str) -> np.ndarray | None:
    """nnU-Net's rotation and scaling as a 3x3 matrix (output -> input offsets), or
    None when neither is drawn (the crop is read as it is)."""
    if mode != "nnunet":
        return None
    rotate, scale = rng.random() < 0.2, rng.random() < 0.2
    angles = rng.uniform(-math.pi / 6, math.pi / 6, 3)
    factor = rng.uniform(0.7, 1.4)
    if not (rotate or scale):
        return None
    matrix = np.eye(3)
    if rotate:
        for axis, angle in enumerate(angles):
            c, s = math.cos(angle), math.sin(angle)
            a, b = [i for i in range(3) if i != axis]
            turn = np.eye(3)
            turn[a, a], turn[a, b], turn[b, a], turn[b, b] = c, -s, s, c
            matrix = turn @ matrix
    return matrix * (factor if scale else 1.0)


def region_size(crop: Sequence[int], matrix: np.ndarray | None) -> tuple[int, ...]:
    """The region to read so that the transformed crop lies inside it: the crop's
    bounding box under ``matrix``, 2 voxels of margin, the crop's parity."""
    if matrix is None:
        return tuple(crop)
    extent = np.abs(matrix) @ np.asarray(crop, dtype=np.float64)
    return tuple(c + 2 * max(0, math.ceil((e - c) / 2) + 2) for c, e in zip(crop, extent))


def warp(
    image: torch.Tensor, label: torch.Tensor | None, matrix: np.ndarray, crop: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The centred ``crop`` of the region under ``matrix`` (trilinear for the image,
    nearest for labels; zeros outside)."""
    size = image.shape[1:]
    affine = matrix * np.asarray(crop)[None, :] / np.asarray(size)[:, None]
    theta = torch.zeros(1, 3, 4, dtype=torch.float32)
    theta[0, :, :3] = torch.from_numpy(affine[::-1, ::-1].copy())  # grid's (x, y, z) = (Z, Y, X)
    grid = F.affine_grid(theta, [1, 1, *crop], align_corners=False)
    image = F.grid_sample(image[None], grid, mode="bilinear", align_corners=False)[0]
    if label is not None:
        label = F.grid_sample(label[None].float(), grid, mode="nearest", align_corners=False)[
            0
        ].long()
    return image, label


def _blur(channel: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    out = channel[None, None]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        padding = [0, 0, 0]
        padding[axis] = radius
        out = F.conv3d(
            F.pad(out, [p for p in reversed(padding) for _ in (0, 1)], mode="replicate"),
            kernel.view(shape),
        )
    return out[0, 0]


def _gamma(channel: torch.Tensor, gamma: float, invert: bool) -> torch.Tensor:
    if invert:
        channel = -channel
    mean, std = channel.mean(), channel.std()
    low, high = channel.min(), channel.max()
    span = (high - low).clamp_min(1e-7)
    out = ((channel - low) / span) ** gamma * span + low
    out = (out - out.mean()) / out.std().clamp_min(1e-7) * std + mean
    return -out if invert else out


def _draw_gamma(rng: np.random.Generator) -> float:
    return rng.uniform(0.7, 1.0) if rng.random() < 0.5 else rng.uniform(1.0, 1.5)


def intensity(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """nnU-Net's intensity transforms, in its order, on a (C, X, Y, Z) crop."""
    image = image.clone()
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    if rng.random() < 0.1:
        variance = rng.uniform(0.0, 0.1)
        image += torch.randn(image.shape, generator=generator) * math.sqrt(variance)
    if rng.random() < 0.2:
        for c in range(image.shape[0]):
            if rng.random() < 0.5:
                image[c] = _blur(image[c], rng.uniform(0.5, 1.0))
    if rng.random() < 0.15:
        image *= rng.uniform(0.75, 1.25)
    if rng.random() < 0.15:
        factor = rng.uniform(0.75, 1.25)
        for c in range(image.shape[0]):
            low, high, mean = image[c].min(), image[c].max(), image[c].mean()
            image[c] = ((image[c] - mean) * factor + mean).clamp(low, high)
    if rng.random() < 0.25:
        for c in range(image.shape[0]):
            if rng.random() < 0.5:
                zoom = rng.uniform(0.5, 1.0)
                size = [max(1, round(s * zoom)) for s in image.shape[1:]]
                small = F.interpolate(image[c][None, None], size=size, mode="nearest")
                image[c] = F.interpolate(
                    small, size=image.shape[1:], mode="trilinear", align_corners=False
                )[0, 0]
    for invert, probability in ((True, 0.1), (False, 0.3)):
        if rng.random() < probability:
            gamma = _draw_gamma(rng)
            for c in range(image.shape[0]):
                image[c] = _gamma(image[c], gamma, invert)
    return image


def mirror(image: torch.Tensor, label: torch.Tensor | None, rng: np.random.Generator):
    axes = [1 + axis for axis in range(3) if rng.random() < 0.5]
    if axes:
        image = image.flip(axes)
        label = label.flip(axes) if label is not None else None
    return image, label

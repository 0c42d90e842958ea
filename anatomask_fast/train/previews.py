"""PNG previews: a slice of the input, the mask with the loss-chosen patches marked,
and the reconstruction (hidden patches from the model, un-normalized per patch when
the model predicts normalized patches)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def gray(slice2d: np.ndarray) -> np.ndarray:
    low, high = np.percentile(slice2d, [1, 99])
    scaled = np.clip((slice2d - low) / max(high - low, 1e-6), 0, 1)
    return np.repeat((scaled * 255).astype(np.uint8)[..., None], 3, axis=-1)


def _cells(grid2d: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A patch-grid map (h, w) expanded to pixels (H, W)."""
    return np.repeat(np.repeat(grid2d, shape[0] // grid2d.shape[0], 0),
                     shape[1] // grid2d.shape[1], 1)


def denormalized(rec: torch.Tensor, x: torch.Tensor, patch: int, eps: float = 1e-6) -> torch.Tensor:
    """``rec`` (predicting per-patch normalized targets) mapped back to intensities with
    each patch's mean and unbiased standard deviation of ``x``."""
    B, C, H, W, D = x.shape
    def cells(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(B, C, H // patch, patch, W // patch, patch, D // patch, patch)
    target = cells(x.float())
    dims = (1, 3, 5, 7)
    mean = target.mean(dims, keepdim=True)
    std = (target.var(dims, keepdim=True) + eps).sqrt()
    return (cells(rec.float()) * std + mean).reshape(B, C, H, W, D)


def save_preview(path: Path, x: torch.Tensor, active: torch.Tensor, hard: torch.Tensor | None,
                 rec: torch.Tensor) -> Path:
    """Panels for sample 0, middle slice along the last axis: input | mask (hidden
    dimmed, loss-chosen patches red) | reconstruction (visible patches from the input)."""
    from PIL import Image

    depth = x.shape[-1] // 2
    cell_depth = depth // (x.shape[-1] // active.shape[-1])
    image = x[0, 0, :, :, depth].float().cpu().numpy()
    visible = active[0, 0, :, :, cell_depth].cpu().numpy()
    pixels_visible = _cells(visible, image.shape)
    shown = gray(image)
    masked = shown.copy()
    masked[~pixels_visible] = (masked[~pixels_visible] * 0.25).astype(np.uint8)
    if hard is not None:
        chosen = _cells(hard[0, 0, :, :, cell_depth].cpu().numpy(), image.shape)
        masked[chosen] = (0.5 * masked[chosen] + np.array([127, 0, 0])).astype(np.uint8)
    recon = rec[0, 0, :, :, depth].float().cpu().numpy()
    composite = np.where(pixels_visible, image, recon)
    low, high = np.percentile(image, [1, 99])
    recon_rgb = np.repeat((np.clip((composite - low) / max(high - low, 1e-6), 0, 1) * 255)
                          .astype(np.uint8)[..., None], 3, axis=-1)
    gap = np.full((image.shape[0], 4, 3), 255, dtype=np.uint8)
    panel = np.concatenate([shown, gap, masked, gap, recon_rgb], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(panel).resize((panel.shape[1] * 3, panel.shape[0] * 3),
                                  Image.NEAREST).save(path)
    return path

"""PNG figures of the runs, each titled with what it shows: pretraining previews (a
slice of the input, the mask with the loss-chosen patches marked, the reconstruction:
hidden patches from the model, un-normalized per patch when the model predicts
normalized patches), and the layout every figure shares (:func:`save_figure`: a title,
labelled panels, a legend of colours and an intensity colour bar)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

SCALE = 3  # pixels per voxel
HIDDEN_DIM = 0.25  # brightness of hidden patches in the mask panel
HARD = (127, 0, 0)  # red added to the loss-chosen (hard) patches


def window(slice2d: np.ndarray) -> tuple[float, float]:
    """The displayed intensity range: the slice's 1st and 99th percentiles."""
    low, high = np.percentile(slice2d, [1, 99])
    return float(low), float(max(high, low + 1e-6))


def gray(slice2d: np.ndarray, shown: tuple[float, float] | None = None) -> np.ndarray:
    """RGB of a slice, ``shown`` (default :func:`window`) mapped to black..white."""
    low, high = shown or window(slice2d)
    scaled = np.clip((slice2d - low) / (high - low), 0, 1)
    return np.repeat((scaled * 255).astype(np.uint8)[..., None], 3, axis=-1)


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def save_figure(
    path: Path,
    panels: Sequence[tuple[str, np.ndarray]],
    title: str,
    *,
    legend: Sequence[tuple[Sequence[float], str]] = (),
    colorbar: tuple[float, float, str] | None = None,
) -> Path:
    """A PNG of panels (label, H x W x 3 uint8) side by side at :data:`SCALE` pixels per
    voxel under ``title``; below them a ``legend`` (colour, name) and a gray
    ``colorbar`` (low, high, what the intensities are). The title and the legend's
    names are also the PNG's ``Title`` and ``Legend`` text chunks."""
    from PIL import Image, ImageDraw, PngImagePlugin

    title_font, font = _font(15), _font(12)
    gap, pad, line = 8, 6, 18
    height = panels[0][1].shape[0] * SCALE
    sizes = [p.shape[1] * SCALE for _, p in panels]
    columns = [max(w, int(font.getlength(label)) + 4) for (label, _), w in zip(panels, sizes)]
    legend_width = sum(24 + int(font.getlength(name)) for _, name in legend)
    width = 2 * pad + max(
        sum(columns) + gap * (len(panels) - 1), int(title_font.getlength(title)), legend_width, 400
    )
    top = pad + line + line  # the title, then the panel labels
    rows = (1 if legend else 0) + (1 if colorbar else 0)
    canvas = Image.new("RGB", (width, top + height + pad + rows * (line + 6) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, pad), title, fill="black", font=title_font)
    x = pad
    for (label, pixels), w, column in zip(panels, sizes, columns):
        draw.text((x, pad + line + 2), label, fill="black", font=font)
        canvas.paste(Image.fromarray(pixels).resize((w, height), Image.NEAREST), (x, top))
        x += column + gap
    y = top + height + pad
    if legend:
        x = pad
        for color, name in legend:
            draw.rectangle(
                [x, y + 3, x + 12, y + 15], fill=tuple(int(c) for c in color), outline="black"
            )
            draw.text((x + 16, y + 2), name, fill="black", font=font)
            x += 24 + int(draw.textlength(name, font=font))
        y += line + 6
    if colorbar:
        low, high, what = colorbar
        ramp = np.repeat(np.linspace(0, 255, 160, dtype=np.float32)[None], 12, 0)
        draw.text((pad, y + 2), f"{low:.3g}", fill="black", font=font)
        x = pad + 8 + int(draw.textlength(f"{low:.3g}", font=font))
        canvas.paste(
            Image.fromarray(np.repeat(ramp.astype(np.uint8)[..., None], 3, -1)), (x, y + 3)
        )
        draw.text((x + 166, y + 2), f"{high:.3g}  {what}", fill="black", font=font)
    text = PngImagePlugin.PngInfo()
    text.add_text("Title", title)
    text.add_text("Legend", "; ".join(name for _, name in legend))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, pnginfo=text)
    return path


def _cells(grid2d: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A patch-grid map (h, w) expanded to pixels (H, W)."""
    return np.repeat(
        np.repeat(grid2d, shape[0] // grid2d.shape[0], 0), shape[1] // grid2d.shape[1], 1
    )


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


def save_preview(
    path: Path,
    x: torch.Tensor,
    active: torch.Tensor,
    hard: torch.Tensor | None,
    rec: torch.Tensor,
    *,
    title: str,
) -> Path:
    """Panels for sample 0, middle slice along the last axis: input | mask (hidden
    dimmed, loss-chosen patches red) | reconstruction (visible patches from the input),
    under ``title`` (what run, epoch, mask ratio and hard share it shows)."""
    depth = x.shape[-1] // 2
    cell_depth = depth // (x.shape[-1] // active.shape[-1])
    image = x[0, 0, :, :, depth].float().cpu().numpy()
    visible = active[0, 0, :, :, cell_depth].cpu().numpy()
    pixels_visible = _cells(visible, image.shape)
    shown = window(image)
    plain = gray(image, shown)
    masked = plain.copy()
    masked[~pixels_visible] = (masked[~pixels_visible] * HIDDEN_DIM).astype(np.uint8)
    legend = [((255 * HIDDEN_DIM,) * 3, "hidden patch"), ((230, 230, 230), "visible patch")]
    if hard is not None:
        chosen = _cells(hard[0, 0, :, :, cell_depth].cpu().numpy(), image.shape)
        masked[chosen] = (0.5 * masked[chosen] + np.array(HARD)).astype(np.uint8)
        legend.append(((127 + 32, 32, 32), "hidden, chosen by the teacher's error (hard)"))
    recon = rec[0, 0, :, :, depth].float().cpu().numpy()
    composite = gray(np.where(pixels_visible, image, recon), shown)
    panels = [
        ("input", plain),
        ("mask", masked),
        ("reconstruction (hidden from the model)", composite),
    ]
    return save_figure(
        path,
        panels,
        f"{title}; sample 0, slice {depth} of the last axis",
        legend=legend,
        colorbar=(*shown, "normalized intensity"),
    )

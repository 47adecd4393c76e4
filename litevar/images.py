"""Writing images: atomic PNG files and labelled grids."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .files import write_atomic


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [0, 1], [B, 3, H, W] or [3, H, W] of any float dtype -> uint8 numpy [B, H, W, 3] or [H, W, 3].

    The one conversion every command uses (computed in float32, clamped, rounded to nearest), so a PNG, an
    ``.npz`` and an evaluation array of the same image hold the same bytes.

    Example:
        >>> to_uint8(torch.tensor([0.0, 0.5, 1.0]).view(3, 1, 1)).tolist()
        [[[0, 128, 255]]]
    """
    uint8 = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return uint8.movedim(-3, -1).cpu().numpy()


def save_png_atomic(array_HW3: np.ndarray, path: Path) -> None:
    write_atomic(path, lambda tmp: Image.fromarray(array_HW3).save(tmp, format="PNG"))


def grid(images: list[np.ndarray], columns: int, row_labels: list[str] | None = None) -> Image.Image:
    """Tile equally sized uint8 HWC images row-major; optional text label at the left of each row.

    Images smaller than 96 px are enlarged (nearest neighbour, integer factor) so that the grid is viewable."""
    scale = max(1, 96 // images[0].shape[0])
    if scale > 1:
        images = [np.repeat(np.repeat(img, scale, axis=0), scale, axis=1) for img in images]
    h, w = images[0].shape[:2]
    rows = (len(images) + columns - 1) // columns
    margin = 0 if row_labels is None else 72
    canvas = Image.new("RGB", (margin + columns * w, rows * h), "white")
    for i, image in enumerate(images):
        canvas.paste(Image.fromarray(image), (margin + (i % columns) * w, (i // columns) * h))
    if row_labels is not None:
        draw = ImageDraw.Draw(canvas)
        for r, label in enumerate(row_labels[:rows]):
            draw.text((4, r * h + h // 2 - 5), label, fill="black")
    return canvas

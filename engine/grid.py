"""Sample grids: images in ``[-1, 1]`` to uint8 and to a PNG mosaic (no torchvision needed).

Layout follows ``torchvision.utils.make_grid``: ``nrow`` is the number of images per row, each image is
surrounded by ``2`` px of black padding, so a grid of ``rows x cols`` images of size ``H x W`` is
``(rows * (H + 2) + 2)`` pixels high and ``(cols * (W + 2) + 2)`` pixels wide.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["to_uint8", "image_grid", "save_grid"]

PADDING = 2


def to_uint8(images: Any) -> np.ndarray:
    """(N, 3, H, W) float in [-1, 1] (torch or numpy) -> (N, H, W, 3) uint8; values outside are clipped.

    A single image (3, H, W) is treated as N = 1; one-channel images (N, 1, H, W) are repeated to RGB.
    """
    if hasattr(images, "detach"):  # torch.Tensor
        images = images.detach().float().cpu().numpy()
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (N, 3, H, W), got {x.shape}")
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    x = np.rint((np.clip(x, -1.0, 1.0) + 1.0) * 127.5)  # [-1, 1] -> {0, ..., 255}
    return x.astype(np.uint8).transpose(0, 2, 3, 1)  # (N, H, W, 3)


def image_grid(images: Any, nrow: int | None = None) -> Image.Image:
    """Mosaic of (N, 3, H, W) images in [-1, 1] as an RGB PIL image.

    Args:
        images: (N, 3, H, W), N >= 1.
        nrow: images per row; default ``ceil(sqrt(N))`` (a near-square grid).
    """
    x = to_uint8(images)  # (N, H, W, 3)
    n, h, w, _ = x.shape
    if n == 0:
        raise ValueError("image_grid needs at least one image")
    cols = int(nrow) if nrow is not None else math.ceil(math.sqrt(n))
    if cols < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    p = PADDING
    canvas = np.zeros((rows * (h + p) + p, cols * (w + p) + p, 3), dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        y0, x0 = p + r * (h + p), p + c * (w + p)
        canvas[y0:y0 + h, x0:x0 + w] = x[i]
    return Image.fromarray(canvas)  # (H_grid, W_grid, 3) uint8 -> RGB


def save_grid(images: Any, path: str | Path, nrow: int | None = None) -> Path:
    """Write :func:`image_grid` of ``images`` to ``path`` (format from the suffix, e.g. PNG); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, nrow=nrow).save(path)
    return path

"""Images in [-1, 1] to 8-bit pixels, grids of them, and PNG files (local or ``gs://``)."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from etils import epath
from PIL import Image

__all__ = [
    "MIN_DISPLAY_SIZE",
    "display_scale",
    "make_grid",
    "save_image_grid",
    "to_uint8",
]

# Images smaller than this (pixels, height) are enlarged by an integer nearest-neighbour factor
# in saved grids: 8x8 digits become 32x32, 28x28 MNIST 56x56; 32x32 and larger stay as they are.
MIN_DISPLAY_SIZE = 32

_CHANNELS_TO_MODE = {1: "L", 3: "RGB", 4: "RGBA"}


def to_uint8(x: Any) -> np.ndarray:
    """Map data in [-1, 1] to pixels in {0, ..., 255}: round((x + 1) 127.5), clipped.

    The inverse of the scaling x = 2 p / 255 - 1 used for the data (Ho et al. 2020 Sec. 3.3);
    NaN becomes 0 so that a diverged sample shows as black instead of failing the save.
    """
    x = np.nan_to_num(np.asarray(x, dtype=np.float32), nan=-1.0)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _check_images(images: Any) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images have shape {images.shape}; allowed: [N >= 1, H, W, C]")
    return images


def make_grid(
    images: Any, ncols: int | None = None, *, padding: int = 2, pad_value: int | float = 0
) -> np.ndarray:
    """Tile images [N, H, W, C] row by row into one image [H', W', C].

    :param ncols: images per row; default ceil(sqrt(N)) (a square-ish grid).
    :param padding: pixels between images and around the border.
    :param pad_value: the value of padding and of unused cells (same dtype as the images).
    :return: [rows (H + p) + p, ncols (W + p) + p, C], rows = ceil(N / ncols).
    """
    images = _check_images(images)
    n, h, w, c = images.shape
    ncols = math.ceil(math.sqrt(n)) if ncols is None else ncols
    if not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"ncols = {ncols!r}; allowed: an integer >= 1")
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding = {padding!r}; allowed: an integer >= 0")
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    p = padding
    grid = np.full((nrows * (h + p) + p, ncols * (w + p) + p, c), pad_value, images.dtype)
    for k in range(n):
        r, col = divmod(k, ncols)
        top, left = p + r * (h + p), p + col * (w + p)
        grid[top : top + h, left : left + w] = images[k]
    return grid


def display_scale(height: int) -> int:
    """Integer upscaling factor of saved grids: ceil(MIN_DISPLAY_SIZE / H), at least 1."""
    return max(1, math.ceil(MIN_DISPLAY_SIZE / height))


def save_image_grid(
    images: Any, path: str | epath.PathLike, *, ncols: int | None = None, padding: int = 2
) -> None:
    """Save images [N, H, W, C] as one PNG grid at ``path`` (any etils.epath path, e.g. gs://).

    Float images are taken to be in [-1, 1] (:func:`to_uint8`); uint8 images are written as they
    are. C = 1 is saved as grayscale, C = 3 as RGB. Images shorter than ``MIN_DISPLAY_SIZE``
    pixels are enlarged by :func:`display_scale` (nearest neighbour) before tiling, so that the
    padding stays ``padding`` pixels wide. Parent directories are created.
    """
    images = _check_images(images)
    if images.dtype != np.uint8:
        images = to_uint8(images)
    c = images.shape[-1]
    if c not in _CHANNELS_TO_MODE:
        raise ValueError(f"images have {c} channels; allowed: {sorted(_CHANNELS_TO_MODE)}")
    scale = display_scale(images.shape[1])
    images = np.repeat(np.repeat(images, scale, axis=1), scale, axis=2)
    grid = make_grid(images, ncols, padding=padding)  # [H', W', C] uint8
    pixels = grid[..., 0] if c == 1 else grid
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    out = epath.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buffer.getvalue())

"""Per-image preprocessing on uint8 NHWC data: crop, resize, flip, scale to [-1, 1].

Geometry stays in uint8 (cheap to move between threads and processes); only whole batches are
converted to float32 at the end (`to_model_range`).
"""

from collections.abc import Callable

import numpy as np
from PIL import Image

# Aligned CelebA (218x178): 128x128 box centred on row 121, column 89, as in the CelebA
# experiments of Song et al. 2021 (DDIM).
_CELEBA_FACE_ROWS = slice(121 - 64, 121 + 64)
_CELEBA_FACE_COLS = slice(89 - 64, 89 + 64)


def center_square_crop(image: np.ndarray) -> np.ndarray:
    """Largest centred square of `image` [H, W, C] -> [S, S, C], S = min(H, W)."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return image[top : top + side, left : left + side]


def celeba_face_crop(image: np.ndarray) -> np.ndarray:
    """The 128x128 face box of an aligned 218x178 CelebA image [218, 178, C] -> [128, 128, C]."""
    if image.shape[:2] != (218, 178):
        raise ValueError(f"celeba_face crop needs a 218x178 image; got {image.shape[:2]}")
    return image[_CELEBA_FACE_ROWS, _CELEBA_FACE_COLS]


CROPS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "center_square": center_square_crop,
    "celeba_face": celeba_face_crop,
}


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Bicubic resize of uint8 `image` [H, W, C] -> [size, size, C].

    Pillow's bicubic filter widens its support when downsampling (antialiasing), so large
    reductions (LSUN, CelebA-HQ 256 -> 64) do not alias.
    """
    if image.shape[:2] == (size, size):
        return image
    channels = image.shape[-1]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    out = np.asarray(pil.resize((size, size), resample=Image.Resampling.BICUBIC))
    return out.reshape(size, size, channels)


def crop_and_resize(image: np.ndarray, *, crop: str, image_size: int) -> np.ndarray:
    """Apply `CROPS[crop]` then resize: uint8 [H, W, C] -> uint8 [image_size, image_size, C]."""
    if crop not in CROPS:
        raise ValueError(f"unknown crop '{crop}'; allowed: {', '.join(CROPS)}")
    if image.ndim == 2:  # Some decoders drop the channel axis of grey images.
        image = image[..., None]
    return resize(CROPS[crop](image), image_size)


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 {0..255} -> float32 [-1, 1] via x / 127.5 - 1 (Ho et al. 2020 sec. 3.3)."""
    return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)

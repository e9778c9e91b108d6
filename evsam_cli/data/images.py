"""Reading images and bringing any pixel layout to HxWx3 uint8 RGB."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Grayscale (HxW, HxWx1), RGBA (alpha dropped), 16-bit and float [0, 1] -> HxWx3 uint8.

    Raises ``DataError`` for anything that is not an image-shaped array.
    """
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"expected an HxW, HxWx1, HxWx3 or HxWx4 image, got an array of shape {arr.shape}")
    if arr.dtype == np.uint8:
        pass
    elif arr.dtype == np.uint16:
        arr = np.round(arr.astype(np.float32) / 257.0).astype(np.uint8)
    elif arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
        arr = np.clip(np.round(arr.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.integer):
        # Other integer images (int32 "I" mode, 12-bit ...): scale by the dtype's or the data's range.
        top = max(int(arr.max()), 1)
        top = 255 if top <= 255 else (65535 if top <= 65535 else top)
        arr = np.round(arr.astype(np.float64) * (255.0 / top)).astype(np.uint8)
    else:
        raise DataError(f"unsupported image dtype {arr.dtype}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[:, :, :3]
    return np.ascontiguousarray(arr)


def pil_to_rgb_uint8(img: Image.Image) -> np.ndarray:
    """A PIL image of any mode (L, LA, P, RGBA, I;16, I, F, CMYK ...) -> HxWx3 uint8 RGB."""
    if img.mode in ("RGB", "L", "RGBA"):
        return to_rgb_uint8(np.asarray(img))
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        arr = np.asarray(img)
        if img.mode == "F":
            top = float(arr.max()) if arr.size else 1.0
            arr = arr / (top if top > 1.0 else 1.0)
        return to_rgb_uint8(arr)
    return to_rgb_uint8(np.asarray(img.convert("RGB")))


def open_image(fp: Any) -> Image.Image:
    """``PIL.Image.open``, bypassing the process-wide wrapper ultralytics installs when imported.

    That wrapper answers an unidentifiable file by trying to pip-install a HEIF plugin (raising
    ``ModuleNotFoundError`` offline) instead of PIL's ``UnidentifiedImageError``.
    """
    patches = sys.modules.get("ultralytics.utils.patches")
    opener = getattr(patches, "_image_open", None) or Image.open
    return opener(fp)


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode an image file to HxWx3 uint8 RGB; ``DataError`` if missing, truncated or not an image."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    try:
        with open_image(path) as img:
            img.load()
            return pil_to_rgb_uint8(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot decode image {path}: {exc}") from None

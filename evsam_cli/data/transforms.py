"""Image and mask preparation for training: resize-longest-side + pad, done in data workers.

Images travel from the workers as padded uint8 tensors (4x smaller than float) together with
the size of the valid region; ``normalize_padded`` normalises them on the training device and
zeroes the padding, which gives exactly ``Sam.preprocess`` (normalise, then pad with zeros).
Both take the model's preprocessing (``Sam.interpolation`` for the resize, ``Sam.preprocessing``
for the normalisation; ``data.frames.PREPROCESSING``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.frames import MINMAX_EPS, check_preprocessing, preprocess_shape, resize_longest
from ..models.sam import PIXEL_MEAN, PIXEL_STD


def resize_longest_padded(
    image: np.ndarray, size: int, interpolation: str = "bilinear"
) -> tuple[Tensor, tuple[int, int]]:
    """HxWx3 uint8 -> ((3, size, size) uint8 zero-padded at the bottom/right, (h, w) resized size).

    The resize uses SAM's rounding and ``interpolation`` ("bilinear" or "area"), as
    ``Sam.resize_image``.
    """
    image = resize_longest(image, size, interpolation)
    new_h, new_w = image.shape[:2]
    out = torch.zeros(3, size, size, dtype=torch.uint8)
    out[:, :new_h, :new_w] = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)
    return out, (new_h, new_w)


def resize_mask_padded(mask: np.ndarray, size: int) -> Tensor:
    """(H, W) bool -> (size, size) float {0,1}: resized (nearest) like the image, zero padding."""
    h, w = mask.shape
    new_h, new_w = preprocess_shape(h, w, size)
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    m = F.interpolate(m, (new_h, new_w), mode="nearest")[0, 0]
    out = torch.zeros(size, size)
    out[:new_h, :new_w] = m
    return out


def normalize_padded(images: Tensor, sizes: Tensor, preprocessing: str = "sam") -> Tensor:
    """(B, 3, S, S) uint8 padded images + (B, 2) valid (h, w) -> normalised float, zero padding.

    ``preprocessing``: "sam" (pixel mean/std) or "minmax-area" (min-max over each image's valid
    region, all channels together, as LiteMedSAM).
    """
    check_preprocessing(preprocessing)
    s = images.shape[-1]
    rows = torch.arange(s, device=images.device).view(1, s, 1) < sizes[:, 0].view(-1, 1, 1).to(images.device)
    cols = torch.arange(s, device=images.device).view(1, 1, s) < sizes[:, 1].view(-1, 1, 1).to(images.device)
    valid = (rows & cols).unsqueeze(1)
    x = images.float()
    if preprocessing == "sam":
        mean = torch.tensor(PIXEL_MEAN, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(PIXEL_STD, device=images.device).view(1, 3, 1, 1)
        x = (x - mean) / std
    else:
        low = x.masked_fill(~valid, float("inf")).amin(dim=(1, 2, 3), keepdim=True)
        high = x.masked_fill(~valid, float("-inf")).amax(dim=(1, 2, 3), keepdim=True)
        x = (x - low) / (high - low).clamp(min=MINMAX_EPS)
    return x * valid

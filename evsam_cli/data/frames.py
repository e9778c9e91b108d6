"""SAM's two coordinate frames, in numpy only (the ONNX runtime imports this without torch).

Images reach the encoder resized so their longest side is the encoder's input size (PIL
bilinear, SAM's rounding) and padded; prompts and masks live in SAM's 1024 prompt frame, where
the image occupies ``preprocess_shape(h, w, 1024)``. Every component converts through here,
and masks come back to the original image through ``upscale_matrices``.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# SAM's constants, shared by the torch model (models/sam.py) and the torch-free exported-model
# runtime (export/runtime.py); exported graphs carry their own values in metadata.
PIXEL_MEAN = (123.675, 116.28, 103.53)  # per-channel normalisation, [0, 255] pixel units
PIXEL_STD = (58.395, 57.12, 57.375)
PROMPT_SIZE = 1024  # side of the frame prompts and masks are expressed in
LOW_RES_SIZE = 256  # side of the decoder's mask logits


def preprocess_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(h, w) after resizing so the longest side is ``long_side`` (SAM's rounding)."""
    scale = long_side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_longest(image: np.ndarray, long_side: int) -> np.ndarray:
    """HxWx3 uint8 -> longest side ``long_side`` (PIL bilinear); returned as is if already so."""
    h, w = image.shape[:2]
    if max(h, w) == long_side:
        return image
    new_h, new_w = preprocess_shape(h, w, long_side)
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))


def coords_to_frame(
    coords: np.ndarray, original_size: tuple[int, int], frame_size: tuple[int, int]
) -> np.ndarray:
    """(..., 2) x,y in original pixels -> the frame where the image is ``frame_size`` (h, w).

    Per-axis scaling in float64, as SAM's ``ResizeLongestSide.apply_coords``.
    """
    out = np.array(coords, dtype=np.float64, copy=True)
    out[..., 0] = out[..., 0] * (frame_size[1] / original_size[1])
    out[..., 1] = out[..., 1] * (frame_size[0] / original_size[0])
    return out


def boxes_to_frame(
    boxes: np.ndarray, original_size: tuple[int, int], frame_size: tuple[int, int]
) -> np.ndarray:
    """(..., 4) xyxy boxes in original pixels -> the frame (see ``coords_to_frame``)."""
    boxes = np.asarray(boxes, dtype=np.float64)
    return coords_to_frame(boxes.reshape(*boxes.shape[:-1], 2, 2), original_size, frame_size).reshape(
        boxes.shape
    )


# ---------------------------------------------------------------------------- mask upscaling
def bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """(out_size, in_size) float64 weights of 1-D bilinear resampling, ``align_corners=False``.

    Row i mixes the two input samples around ``(i + 0.5) * in / out - 0.5`` (clamped at 0),
    exactly as PyTorch's ``upsample_bilinear2d``; 2-D resizing is ``Wy @ x @ Wx.T``.
    """
    scale = in_size / out_size
    src = np.maximum((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    frac = src - i0
    weights = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    np.add.at(weights, (rows, i0), 1.0 - frac)
    np.add.at(weights, (rows, i1), frac)
    return weights


def upscale_matrices(
    input_size: tuple[int, int], original_size: tuple[int, int], prompt_size: int, low_res_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(Ay (H, low), Ax (W, low)) float64 with ``Ay @ low_res @ Ax.T`` = SAM's mask upscaling.

    SAM upsamples the decoder's low-res logits to the prompt frame, crops the image
    (``input_size``) out of it and resizes that to ``original_size``; all three steps are
    linear per axis, so they compose into one matrix per axis.
    """
    return (
        upscale_matrix(input_size[0], original_size[0], prompt_size, low_res_size),
        upscale_matrix(input_size[1], original_size[1], prompt_size, low_res_size),
    )


def upscale_matrix(image_len: int, out_len: int, prompt_size: int, low_res_size: int) -> np.ndarray:
    """One axis of ``upscale_matrices``: (out_len, low_res_size), for an image spanning
    ``image_len`` of the prompt frame along that axis."""
    up = bilinear_matrix(prompt_size, low_res_size)[:image_len]
    return bilinear_matrix(out_len, image_len) @ up


def upscale_bands(
    image_len: int, out_len: int, prompt_size: int, low_res_size: int, block: int = 64
) -> list[tuple[int, int, int, int, np.ndarray]]:
    """``upscale_matrix`` cut into blocks of ``block`` output pixels: (start, stop, lo, hi,
    weights (stop - start, hi - lo) float64), output pixels ``start:stop`` reading only low-res
    pixels ``lo:hi``. The composed resizes have at most a few taps a row, so each block is a
    small matrix product instead of a pass over the whole low-res axis."""
    matrix = upscale_matrix(image_len, out_len, prompt_size, low_res_size)
    bands = []
    for start in range(0, out_len, block):
        stop = min(start + block, out_len)
        read = np.flatnonzero((matrix[start:stop] != 0).any(axis=0))
        lo, hi = int(read[0]), int(read[-1]) + 1
        bands.append((start, stop, lo, hi, matrix[start:stop, lo:hi]))
    return bands

"""SAM's two coordinate frames, in numpy only (the ONNX runtime imports this without torch).

Images reach the encoder resized so their longest side is the encoder's input size (SAM's
rounding), normalised and zero-padded bottom/right, as the model's ``preprocessing`` says
(``PREPROCESSING``); prompts and masks live in the model's prompt frame (SAM's 1024), where the
image occupies ``preprocess_shape(h, w, prompt_size)``. Every component converts through here,
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


# Preprocessing modes -> the interpolation of their resize.
# "sam": SAM's (PIL bilinear, then (x - pixel_mean) / pixel_std per channel).
# "minmax-area": LiteMedSAM's official inference (area interpolation as OpenCV's INTER_AREA, then
#   (x - min) / max(max - min, 1e-8) over the whole resized image, all channels together).
PREPROCESSING: dict[str, str] = {"sam": "bilinear", "minmax-area": "area"}
MINMAX_EPS = 1e-8


def check_preprocessing(mode: str) -> str:
    if mode not in PREPROCESSING:
        raise ValueError(f"unknown preprocessing {mode!r}; known: {', '.join(PREPROCESSING)}")
    return mode


def area_matrix(out_size: int, in_size: int) -> np.ndarray:
    """(out_size, in_size) float64 weights of 1-D area resampling (OpenCV's ``INTER_AREA``).

    Output pixel i covers ``[i, i + 1) * in / out`` of the input axis; its weights are the
    overlaps with the input pixels, divided by the footprint. Shrinking averages whole and
    partial pixels; enlarging mixes at most two neighbours, as OpenCV does.
    """
    scale = in_size / out_size
    lo = np.arange(out_size, dtype=np.float64)[:, None] * scale
    edges = np.arange(in_size, dtype=np.float64)[None, :]
    overlap = np.clip(np.minimum(lo + scale, edges + 1) - np.maximum(lo, edges), 0.0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


def resize_area(image: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """HxWxC uint8 -> new_h x new_w x C uint8 by area interpolation (rounded to nearest)."""
    h, w = image.shape[:2]
    ay, ax = area_matrix(new_h, h), area_matrix(new_w, w)
    channels = np.moveaxis(image, -1, 0).astype(np.float64)  # (C, H, W)
    out = ay @ channels @ ax.T
    return np.ascontiguousarray(np.moveaxis(np.clip(np.rint(out), 0, 255).astype(np.uint8), 0, -1))


def resize_longest(image: np.ndarray, long_side: int, interpolation: str = "bilinear") -> np.ndarray:
    """HxWx3 uint8 -> longest side ``long_side``; returned as is if already so.

    ``interpolation``: "bilinear" (PIL's, as SAM) or "area" (``resize_area``, as LiteMedSAM).
    """
    h, w = image.shape[:2]
    if max(h, w) == long_side:
        return image
    new_h, new_w = preprocess_shape(h, w, long_side)
    if interpolation == "area":
        return resize_area(image, new_h, new_w)
    if interpolation != "bilinear":
        raise ValueError(f"unknown interpolation {interpolation!r}; known: bilinear, area")
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))


def preprocess_image(
    image: np.ndarray,
    size: int,
    *,
    mode: str = "sam",
    pixel_mean: np.ndarray | tuple[float, ...] = (123.675, 116.28, 103.53),
    pixel_std: np.ndarray | tuple[float, ...] = (58.395, 57.12, 57.375),
) -> np.ndarray:
    """HxWx3 uint8 RGB -> (size, size, 3) float32 encoder input: resized (longest side ``size``),
    normalised as ``mode`` says and zero-padded bottom/right. The numpy twin of
    ``Sam.preprocess`` for runtimes without torch."""
    resized = resize_longest(image, size, PREPROCESSING[check_preprocessing(mode)])
    x = resized.astype(np.float32)
    if mode == "sam":
        mean = np.asarray(pixel_mean, dtype=np.float32).reshape(1, 1, 3)
        std = np.asarray(pixel_std, dtype=np.float32).reshape(1, 1, 3)
        x = (x - mean) / std
    else:
        low, high = x.min(), x.max()
        x = (x - low) / max(float(high - low), MINMAX_EPS)
    padded = np.zeros((size, size, 3), dtype=np.float32)
    padded[: x.shape[0], : x.shape[1]] = x
    return padded


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

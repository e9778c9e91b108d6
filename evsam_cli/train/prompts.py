"""Prompt sampling for end-to-end training: a mask's tight box, or 1-10 random points inside it.

Coordinates are pixel coordinates of the mask's own image (x, y; points at pixel centres);
``to_prompt_frame`` scales them into SAM's 1024 prompt frame.
"""

from __future__ import annotations

import numpy as np

from ..data.frames import boxes_to_frame, coords_to_frame, preprocess_shape

MAX_POINTS = 10


def mask_box(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> tight (4,) float32 box ``x0, y0, x1, y1`` (x1/y1 exclusive, as COCO's x+w)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("cannot take the box of an empty mask")
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


def sample_points(
    mask: np.ndarray, rng: np.random.Generator, *, max_points: int = MAX_POINTS
) -> tuple[np.ndarray, np.ndarray]:
    """1..``max_points`` foreground clicks drawn uniformly from the mask's pixels.

    Returns ``(max_points, 2)`` float32 x,y at pixel centres and ``(max_points,)`` int64 labels:
    1 for a click, -1 for padding (SAM's prompt encoder ignores -1 points).
    """
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("cannot sample points inside an empty mask")
    n = int(rng.integers(1, max_points + 1))
    pick = rng.choice(len(xs), size=n, replace=len(xs) < n)
    coords = np.zeros((max_points, 2), dtype=np.float32)
    labels = np.full(max_points, -1, dtype=np.int64)
    coords[:n, 0] = xs[pick] + 0.5
    coords[:n, 1] = ys[pick] + 0.5
    labels[:n] = 1
    return coords, labels


def to_prompt_frame(coords: np.ndarray, original_hw: tuple[int, int], prompt_size: int = 1024) -> np.ndarray:
    """Scale x,y coordinates (any shape ending in 2 or 4) from the image into the prompt frame."""
    frame = preprocess_shape(original_hw[0], original_hw[1], prompt_size)
    coords = np.asarray(coords)
    scaled = (
        boxes_to_frame(coords, original_hw, frame)
        if coords.shape[-1] == 4
        else coords_to_frame(coords, original_hw, frame)
    )
    return scaled.astype(np.float32)

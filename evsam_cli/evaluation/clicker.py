"""The click simulator of the official EfficientViT-SAM point-prompt evaluation (RITM's rule).

Each click goes to the pixel of the larger error region that is farthest from that region's
boundary, with the image border counting as boundary: a positive click in the missed part of
the object (false negatives), a negative one in the wrongly added part (false positives).
Ties between the two regions go to the negative click; ties between pixels to the first in
row-major order; pixels already clicked are never chosen again (unless nothing else is left,
when the official rule falls back to pixel (0, 0)). The first click, made against an empty
prediction, is therefore the object pixel farthest from the object's boundary.

Distances are exact Euclidean distances compared as integer squared distances, so the
choice matches an exact distance transform bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Click:
    y: int
    x: int
    positive: bool


def squared_distance_to_background(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> (H, W) int64 squared Euclidean distance from each True pixel to the nearest
    False pixel or the image border (pixels outside the image count as False); 0 on False."""
    h, w = mask.shape
    out = np.zeros((h, w), dtype=np.int64)
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return out
    # Crop to the mask's bounding box plus a one-pixel ring of background (or of the padding
    # outside the image): the nearest background pixel of any mask pixel lies inside it.
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    padded = np.pad(mask[y0:y1, x0:x1], 1)
    indices = ndimage.distance_transform_edt(padded, return_distances=False, return_indices=True)
    gy, gx = np.mgrid[0 : padded.shape[0], 0 : padded.shape[1]]
    d2 = (indices[0] - gy).astype(np.int64) ** 2 + (indices[1] - gx).astype(np.int64) ** 2
    out[y0:y1, x0:x1] = d2[1:-1, 1:-1]
    return out


class Clicker:
    """Simulated user clicks on one object. ``gt_mask``: (H, W) bool."""

    def __init__(self, gt_mask: np.ndarray) -> None:
        self.gt_mask = np.asarray(gt_mask).astype(bool)
        self.not_clicked = np.ones_like(self.gt_mask)
        self.clicks: list[Click] = []

    def make_next_click(self, pred_mask: np.ndarray) -> Click:
        """Add and return the click that corrects ``pred_mask`` ((H, W) bool) the most."""
        pred = np.asarray(pred_mask).astype(bool)
        fn = squared_distance_to_background(self.gt_mask & ~pred) * self.not_clicked
        fp = squared_distance_to_background(~self.gt_mask & pred) * self.not_clicked
        fn_max, fp_max = int(fn.max()), int(fp.max())
        positive = fn_max > fp_max
        dist = fn if positive else fp
        # argmax returns the first maximum in row-major order ((0, 0) when all are 0).
        y, x = divmod(int(np.argmax(dist)), dist.shape[1])
        click = Click(y=y, x=x, positive=bool(positive))
        self.clicks.append(click)
        self.not_clicked[y, x] = False
        return click

    def points(self) -> tuple[np.ndarray, np.ndarray]:
        """All clicks so far: coordinates (K, 2) as x, y pixels and labels (K,) 1/0."""
        coords = np.array([[c.x, c.y] for c in self.clicks], dtype=np.float64).reshape(-1, 2)
        labels = np.array([int(c.positive) for c in self.clicks], dtype=np.int64)
        return coords, labels

"""Building blocks of automatic mask generation ("segment everything").

Point grids, crop boxes, the stability score, mask boxes, run-length encodings and the
small-region cleanup, with the semantics of segment-anything's ``utils/amg.py`` (written anew;
equal outputs are tested against the official package). Conventions kept from SAM because users
compare against SA-1B and the official generator:

* boxes computed from masks are ``[x0, y0, x1, y1]`` with x1/y1 the *last* covered column/row
  (inclusive), ``[0, 0, 0, 0]`` for an empty mask; the xywh form is ``[x0, y0, x1 - x0, y1 - y0]``;
* uncompressed RLE counts run over the mask in column-major (Fortran) order and start with the
  number of leading zeros (0 when the first pixel is set), ``{"size": [h, w], "counts": [...]}``.
"""

from __future__ import annotations

import math
from itertools import product
from typing import Any

import numpy as np
import torch
from torch import Tensor


# ---------------------------------------------------------------------------- point grids and crops
def build_point_grid(n_per_side: int) -> np.ndarray:
    """(n*n, 2) float64 x,y points at the centres of an n x n tiling of [0, 1]^2, row by row."""
    half_step = 1 / (2 * n_per_side)
    centres = np.linspace(half_step, 1 - half_step, n_per_side)
    xs, ys = np.meshgrid(centres, centres, indexing="xy")
    return np.stack([xs.ravel(), ys.ravel()], axis=-1)


def build_layer_point_grids(n_per_side: int, n_layers: int, downscale: int) -> list[np.ndarray]:
    """One grid per crop layer; layer i has ``int(n_per_side / downscale**i)`` points a side."""
    return [build_point_grid(int(n_per_side / (downscale**i))) for i in range(n_layers + 1)]


def generate_crop_boxes(
    image_size: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """Crop boxes (xyxy, pixels) and their layer index: the whole image, then 2^i x 2^i overlapping
    crops for layer i = 1..n_layers. Crops overlap by ``overlap_ratio`` of the short side in layer
    1, by proportionally less in deeper layers.
    """
    im_h, im_w = image_size
    short_side = min(im_h, im_w)
    boxes: list[list[int]] = [[0, 0, im_w, im_h]]
    layers = [0]
    for layer in range(1, n_layers + 1):
        per_side = 2**layer
        overlap = int(overlap_ratio * short_side * (2 / per_side))
        crop_w = int(math.ceil((overlap * (per_side - 1) + im_w) / per_side))
        crop_h = int(math.ceil((overlap * (per_side - 1) + im_h) / per_side))
        x0s = [int((crop_w - overlap) * i) for i in range(per_side)]
        y0s = [int((crop_h - overlap) * i) for i in range(per_side)]
        for x0, y0 in product(x0s, y0s):  # x-major order, as SAM
            boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layers.append(layer)
    return boxes, layers


# ---------------------------------------------------------------------------- scores and boxes
def stability_score(logits: Tensor, mask_threshold: float, offset: float) -> Tensor:
    """IoU between the masks ``logits > t + offset`` and ``logits > t - offset`` (..., H, W) -> (...).

    The first mask lies inside the second, so the IoU is a ratio of pixel counts. Counts are
    exact integers turned into float32 before dividing (as SAM); an empty loose mask gives NaN,
    which no threshold keeps.
    """
    inter = (logits > (mask_threshold + offset)).sum(dim=(-1, -2), dtype=torch.int64)
    union = (logits > (mask_threshold - offset)).sum(dim=(-1, -2), dtype=torch.int64)
    return inter.to(torch.float32) / union.to(torch.float32)


def masks_to_boxes(masks: Tensor) -> Tensor:
    """Boolean masks (N, H, W) -> (N, 4) int64 inclusive xyxy boxes; [0, 0, 0, 0] when empty."""
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros(0, 4, dtype=torch.int64, device=masks.device)
    rows = masks.any(dim=-1).to(torch.uint8)  # (N, H)
    cols = masks.any(dim=-2).to(torch.uint8)  # (N, W)
    # argmax returns the first maximal index: first covered row/column from each end.
    y0 = rows.argmax(dim=1)
    y1 = h - 1 - rows.flip(1).argmax(dim=1)
    x0 = cols.argmax(dim=1)
    x1 = w - 1 - cols.flip(1).argmax(dim=1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).to(torch.int64)
    empty = rows.amax(dim=1) == 0
    return boxes.masked_fill(empty[:, None], 0)


def mask_to_box(mask: np.ndarray) -> list[int]:
    """One boolean (H, W) mask -> inclusive xyxy box ([0, 0, 0, 0] when empty)."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if len(xs) == 0:
        return [0, 0, 0, 0]
    return [int(xs[0]), int(ys[0]), int(xs[-1]), int(ys[-1])]


def box_near_crop_edge(
    boxes: Tensor, crop_box: list[int], image_box: list[int], atol: float = 20.0
) -> Tensor:
    """(N, 4) xyxy boxes in the crop's frame -> (N,) True where a side lies within ``atol`` pixels
    of a crop border that is not also an image border (such masks are likely cut by the crop).
    """
    x0, y0 = crop_box[0], crop_box[1]
    shifted = boxes.to(torch.float32) + torch.tensor(
        [x0, y0, x0, y0], dtype=torch.float32, device=boxes.device
    )
    crop_t = torch.tensor(crop_box, dtype=torch.float32, device=boxes.device)
    image_t = torch.tensor(image_box, dtype=torch.float32, device=boxes.device)
    near_crop = (shifted - crop_t).abs() <= atol
    near_image = (shifted - image_t).abs() <= atol
    return (near_crop & ~near_image).any(dim=1)


def xyxy_to_xywh(box: list[int] | list[float]) -> list:
    return [box[0], box[1], box[2] - box[0], box[3] - box[1]]


# ---------------------------------------------------------------------------- run-length encodings
def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """Boolean (H, W) mask -> uncompressed COCO RLE (column-major runs, zeros first)."""
    h, w = mask.shape
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return {"size": [h, w], "counts": []}
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0, *counts]
    return {"size": [h, w], "counts": counts}


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Uncompressed or compressed (string/bytes counts) COCO RLE -> boolean (H, W) mask."""
    h, w = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        from pycocotools import mask as mask_utils

        c = counts.encode("ascii") if isinstance(counts, str) else counts
        return mask_utils.decode({"size": [h, w], "counts": c}).astype(bool)
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, np.asarray(counts, dtype=np.int64))
    if flat.size != h * w:
        raise ValueError(f"RLE counts sum to {flat.size}, expected {h}*{w}")
    return flat.reshape(w, h).T


def mask_to_coco_rle(mask: np.ndarray) -> dict[str, Any]:
    """Boolean (H, W) mask -> compressed COCO RLE with a str ``counts`` (JSON-ready)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


# ---------------------------------------------------------------------------- small-region cleanup
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> tuple[np.ndarray, bool]:
    """Fill holes (``mode="holes"``) or drop islands (``"islands"``) smaller than ``area_thresh``.

    Regions are 8-connected components (of the background for holes, of the mask for islands).
    When every island is small the largest one is kept. Returns the new mask and whether it
    changed. Uses scipy.ndimage (SAM uses OpenCV; the components and so the result are the same).
    """
    from scipy import ndimage

    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    holes = mode == "holes"
    working = ~mask if holes else mask
    labels, n = ndimage.label(working, structure=_EIGHT_CONNECTED)
    if n == 0:
        return mask, False
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    small = sizes < area_thresh
    if not small.any():
        return mask, False
    if holes:
        fill = np.concatenate([[True], small])  # label 0 is the mask itself
    else:
        fill = np.concatenate([[False], ~small])
        if not fill.any():
            fill[int(np.argmax(sizes)) + 1] = True  # first of the largest, as SAM
    return fill[labels], True

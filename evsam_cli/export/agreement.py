"""Agreement of a reduced-precision predictor with the float32 PyTorch reference.

For every reduced-precision export (int8 encoder) and bench (bf16, fp16), ``measure_agreement``
runs the same images and box prompts through the float32 ``SamPredictor`` and the candidate
(``SamPredictor`` over a ``reduced_model`` copy, ``OnnxSamPredictor`` over an int8 encoder...)
and reports:

* ``embedding_rel_l2``: ``||e - e_ref|| / ||e_ref||`` of the image embeddings (mean, max);
* ``mask_iou``: IoU of the single-mask outputs of box prompts (mean, min over all boxes);
  two empty masks count as agreeing (IoU 1).

The default image set, ``agreement_images``, is held out from the default calibration set
(other seeds of the same generator) plus ``parity.synthetic_image``; boxes are the generated
objects' own boxes, so they cover real shapes rather than random rectangles.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from .quantize import CalibrationImage

BOXES_PER_IMAGE = 8


class _Predictor(Protocol):
    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None: ...
    def get_image_embedding(self) -> Any: ...
    def predict_batch(self, *args: Any, **kwargs: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


def _boxes_from_masks(masks: Sequence[np.ndarray], limit: int) -> np.ndarray:
    boxes = []
    for mask in masks:
        ys, xs = np.nonzero(mask)
        if len(xs) >= 16:
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return np.asarray(boxes[:limit], dtype=np.float64).reshape(-1, 4)


def fallback_boxes(height: int, width: int, count: int = BOXES_PER_IMAGE, seed: int = 0) -> np.ndarray:
    """``count`` deterministic xyxy boxes of 10-60% of the image side, for images without objects."""
    rng = np.random.default_rng(seed)
    size = rng.uniform(0.1, 0.6, (count, 2)) * [width, height]
    corner = rng.uniform(0, 1, (count, 2)) * ([width, height] - size)
    return np.concatenate([corner, corner + size], axis=1)


def agreement_images(count: int = 3, seed: int = 1000) -> list[tuple[CalibrationImage, np.ndarray]]:
    """Held-out generated photographs (seeds distinct from the calibration set's) and the parity
    image, each with its box prompts."""
    from ..data.synthetic import synth_image
    from .parity import synthetic_image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        image, _, visible = synth_image(rng, 480, 640, 8)
        boxes = _boxes_from_masks(visible, BOXES_PER_IMAGE)
        if len(boxes) < 2:
            boxes = fallback_boxes(480, 640, seed=i)
        out.append((CalibrationImage(f"synthetic-holdout-{i}", image), boxes))
    parity = synthetic_image()
    out.append((CalibrationImage("parity-synthetic", parity), fallback_boxes(*parity.shape[:2])))
    return out


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boolean masks (N, ...) pairwise along the first axis; 1 where both are empty."""
    a = a.reshape(a.shape[0], -1).astype(bool)
    b = b.reshape(b.shape[0], -1).astype(bool)
    inter = (a & b).sum(1)
    union = (a | b).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def measure_agreement(
    reference: _Predictor,
    candidate: _Predictor,
    images: Sequence[tuple[CalibrationImage, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Embedding relative L2 error and box-mask IoU of ``candidate`` against ``reference``.

    Args:
      reference: the float32 ``SamPredictor``.
      candidate: any predictor with ``set_image``, ``get_image_embedding``, ``predict_batch``.
      images: (image, (N, 4) xyxy boxes) pairs; default ``agreement_images()``.
    Returns:
      the ``"agreement"`` object of ``export.json``.
    """
    if images is None:
        images = agreement_images()
    rel_l2: list[float] = []
    ious: list[np.ndarray] = []
    for item, boxes in images:
        reference.set_image(item.image)
        candidate.set_image(item.image)
        ref_emb = _numpy(reference.get_image_embedding())
        emb = _numpy(candidate.get_image_embedding())
        rel_l2.append(float(np.linalg.norm(emb - ref_emb) / max(np.linalg.norm(ref_emb), 1e-12)))
        ref_masks = reference.predict_batch(boxes=boxes, multimask_output=False)[0]
        masks = candidate.predict_batch(boxes=boxes, multimask_output=False)[0]
        ious.append(mask_iou(masks[:, 0], ref_masks[:, 0]))
    iou = np.concatenate(ious)
    return {
        "reference": "float32 PyTorch (SamPredictor)",
        "images": [item.name for item, _ in images],
        "boxes": int(iou.size),
        "embedding_rel_l2": {"mean": float(np.mean(rel_l2)), "max": float(np.max(rel_l2))},
        "mask_iou": {"mean": float(iou.mean()), "min": float(iou.min())},
    }

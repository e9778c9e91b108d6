"""Scores: per-instance mask IoU with COCO area buckets, and COCO / LVIS mask AP.

mIoU follows the official EfficientViT-SAM evaluation: the plain mean of per-instance IoU in
percent, bucketed on the annotation's stored ``area`` with inclusive bounds (small:
area <= 32^2, medium: 32^2 <= area <= 96^2, large: area >= 96^2), so an instance exactly on a
bound counts in both buckets. AP comes from pycocotools' COCOeval (segm) or the ``lvis``
package's LVISEval (300 detections per image), with their printing silenced.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError, MissingDependencyError

SMALL_MAX = 32**2
LARGE_MIN = 96**2
COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
LVIS_KEYS = (*COCO_KEYS, "APr", "APc", "APf")
LVIS_MAX_DETS = 300


def mask_iou(pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor) -> torch.Tensor:
    """IoU in percent of (N, H, W) boolean masks, pairwise along N -> (N,) float64.

    An empty union (both masks empty) scores 0.
    """
    p = torch.as_tensor(pred).bool()
    g = torch.as_tensor(gt, device=p.device).bool()
    if p.shape != g.shape:
        raise ValueError(f"mask shapes differ: {tuple(p.shape)} vs {tuple(g.shape)}")
    inter = (p & g).flatten(1).sum(1).double()
    union = (p | g).flatten(1).sum(1).double()
    return torch.where(union > 0, inter / union.clamp(min=1) * 100.0, torch.zeros_like(union)).cpu()


def area_buckets(area: float) -> tuple[bool, bool, bool]:
    """(small, medium, large) membership of an annotation area (inclusive bounds)."""
    return area <= SMALL_MAX, SMALL_MAX <= area <= LARGE_MIN, area >= LARGE_MIN


def miou_summary(areas: Sequence[float], ious: Sequence[float]) -> dict[str, float | None]:
    """Mean IoU (percent) overall and per bucket; an empty bucket is None."""
    sums = {"all": [0.0, 0], "small": [0.0, 0], "medium": [0.0, 0], "large": [0.0, 0]}
    for area, iou in zip(areas, ious, strict=True):
        small, medium, large = area_buckets(float(area))
        for key, member in (("all", True), ("small", small), ("medium", medium), ("large", large)):
            if member:
                sums[key][0] += float(iou)
                sums[key][1] += 1
    return {k: (s / n if n else None) for k, (s, n) in sums.items()}


def _stat(value: float) -> float | None:
    """COCOeval writes -1 for an undefined entry (no ground truth in that range)."""
    return None if value is None or value < 0 or not np.isfinite(value) else float(value) * 100.0


def coco_segm_metrics(
    gt: dict[str, Any], predictions: list[dict[str, Any]], *, image_ids: Sequence[int] | None = None
) -> dict[str, float | None]:
    """COCO mask AP (percent) of ``predictions`` (COCO results with RLE ``segmentation``).

    ``image_ids`` restricts scoring to the evaluated images (so ``--limit`` and skipped images
    do not count as misses). Without any prediction every AP is 0.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not predictions:
        return dict.fromkeys(COCO_KEYS, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes([{k: v for k, v in p.items() if k != "bbox"} for p in predictions])
        coco_eval = COCOeval(coco_gt, coco_dt, "segm")
        if image_ids is not None:
            coco_eval.params.imgIds = sorted(int(i) for i in image_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return {k: _stat(v) for k, v in zip(COCO_KEYS, coco_eval.stats[:6], strict=True)}


def import_lvis() -> Any:
    """The ``lvis`` package, usable under numpy 2.

    lvis 0.5.3 (the latest release) calls ``astype(dtype=np.float)`` while accumulating;
    numpy 2 removed that alias, which only ever meant the builtin ``float``. Restoring the
    alias (only when it is missing) lets the unmodified package run; nothing else changes.
    """
    if "float" not in np.__dict__:
        np.float = float  # type: ignore[attr-defined]
    try:
        import lvis
    except ImportError:
        raise MissingDependencyError("lvis", "lvis", "LVIS evaluation") from None
    return lvis


def lvis_segm_metrics(
    annotation_file: str | Path,
    predictions: list[dict[str, Any]],
    *,
    image_ids: Sequence[int] | None = None,
    max_dets: int = LVIS_MAX_DETS,
) -> dict[str, float | None]:
    """LVIS v1 mask AP (percent): AP, AP50, AP75, APs/m/l and APr/APc/APf (rare/common/frequent)."""
    lvis = import_lvis()
    if not predictions:
        return dict.fromkeys(LVIS_KEYS, 0.0)
    results = [{k: v for k, v in p.items() if k != "bbox"} for p in predictions]
    lvis_logger = logging.getLogger("lvis")
    level = lvis_logger.level
    lvis_logger.setLevel(logging.ERROR)  # it logs every step at INFO and warns about in-memory results
    try:
        return _run_lvis(lvis, annotation_file, results, image_ids, max_dets)
    finally:
        lvis_logger.setLevel(level)


def _run_lvis(
    lvis: Any,
    annotation_file: str | Path,
    results: list[dict[str, Any]],
    image_ids: Sequence[int] | None,
    max_dets: int,
) -> dict[str, float | None]:
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # lvis calls Logger.warn
        try:
            gt = lvis.LVIS(str(annotation_file))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{annotation_file} is not an LVIS annotation file ({exc!r})") from None
        dt = lvis.LVISResults(gt, results, max_dets=max_dets)
        ev = lvis.LVISEval(gt, dt, "segm")
        if image_ids is not None:
            ev.params.img_ids = sorted(int(i) for i in image_ids)
        ev.run()
        stats = ev.get_results()
    return {k: _stat(stats[k]) for k in LVIS_KEYS}

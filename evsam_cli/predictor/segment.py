"""Prompted prediction on one image file, written to a folder (behind `evsam predict`)."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..data.images import load_image
from ..utils.devices import resolve_device
from ..utils.io import atomic_path, write_json_atomic
from .amg_settings import AmgSettings
from .visualize import overlay_masks


def _save_png(path: Path, image: Image.Image) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def mask_bbox(mask: np.ndarray) -> list[int]:
    """Tight xywh box of a boolean mask ([0, 0, 0, 0] when empty)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0, 0, 0, 0]
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def predict_image(
    *,
    image_path: str | Path,
    output: str | Path,
    model_name: str,
    checkpoint: str | None,
    boxes: Sequence[Sequence[float]] = (),
    points: Sequence[tuple[float, float, int]] = (),
    multimask_output: bool | None = None,
    device: str = "cpu",
    dtype: str = "fp32",
) -> dict[str, Any]:
    """Run the model on one image and write ``mask_<i>.png``, ``overlay.png`` and ``scores.json``.

    ``dtype``: the predictor's precision ("fp32", "bf16", "fp16"; ``SamPredictor``).

    Prompts: every box is its own prompt, except that points (all together) and at most one box
    form a single prompt. ``multimask_output=None`` means multimask only for a lone point.
    Returns the content of ``scores.json``.
    """
    from ..models import create_model
    from .sam_predictor import SamPredictor

    output = Path(output)
    image = load_image(image_path)
    dev = resolve_device(device)
    from ..accel.precision import check_dtype

    check_dtype(dtype, dev)  # before the model is built
    model = create_model(model_name, checkpoint=checkpoint, device=dev)
    predictor = SamPredictor(model, dtype=dtype)

    t0 = time.perf_counter()
    predictor.set_image(image)
    t1 = time.perf_counter()

    if multimask_output is None:
        multimask_output = len(points) == 1 and not boxes
    box_arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) if boxes else None
    if points:
        coords = np.asarray([[p[0], p[1]] for p in points], dtype=np.float64)[None]
        labels = np.asarray([p[2] for p in points], dtype=np.int64)[None]
        masks, scores, _ = predictor.predict_batch(
            point_coords=coords, point_labels=labels, boxes=box_arr, multimask_output=multimask_output
        )
        parts = [f"box {','.join(f'{v:g}' for v in b)}" for b in boxes]
        parts += [f"{'+' if p[2] == 1 else '-'}({p[0]:g},{p[1]:g})" for p in points]
        descriptions = [" + ".join(parts)]
    else:
        masks, scores, _ = predictor.predict_batch(boxes=box_arr, multimask_output=multimask_output)
        descriptions = [f"box {','.join(f'{v:g}' for v in b)}" for b in boxes]
    t2 = time.perf_counter()

    output.mkdir(parents=True, exist_ok=True)
    best_masks = []
    prompts = []
    for i, (m, s) in enumerate(zip(masks, scores, strict=True)):
        best = int(np.argmax(s))
        mask = m[best]
        best_masks.append(mask)
        name = f"mask_{i}.png"
        _save_png(output / name, Image.fromarray(mask.astype(np.uint8) * 255))
        prompts.append(
            {
                "index": i,
                "description": descriptions[i],
                "box": list(map(float, boxes[i if not points else 0])) if boxes else None,
                "points": [[float(p[0]), float(p[1])] for p in points] if points else None,
                "labels": [int(p[2]) for p in points] if points else None,
                "scores": [float(v) for v in s],
                "best": best,
                "area": int(mask.sum()),
                "bbox": mask_bbox(mask),
                "mask": name,
            }
        )
    overlay = overlay_masks(
        image,
        best_masks,
        boxes=boxes or None,
        points=[(p[0], p[1]) for p in points] or None,
        point_labels=[p[2] for p in points] or None,
    )
    _save_png(output / "overlay.png", overlay)
    result = {
        "image": str(image_path),
        "image_size": [int(image.shape[0]), int(image.shape[1])],
        "model": model.name,
        "checkpoint": checkpoint,
        "multimask_output": bool(multimask_output),
        "dtype": dtype,
        "prompts": prompts,
        "encoder_seconds": t1 - t0,
        "decoder_seconds": t2 - t1,
    }
    write_json_atomic(output / "scores.json", result)
    json.dumps(result)  # fail loudly here rather than leave a non-serialisable result to callers
    return result


def predict_everything(
    *,
    image_path: str | Path,
    output: str | Path,
    model_name: str,
    checkpoint: str | None,
    settings: AmgSettings | None = None,
    device: str = "cpu",
    dtype: str = "fp32",
    progress: Callable[[int, int], None] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """ "Segment everything" in one image; writes ``masks.json`` and ``overlay.png`` to ``output``.

    ``settings`` (default ``AmgSettings()``) and ``overrides`` (``AmgSettings`` fields by name,
    e.g. ``points_per_side=16``) are the generator's settings; masks are always COCO RLE.
    ``masks.json`` has SA-1B's layout: ``{"image": {"file_name", "height", "width"},
    "annotations": [{"id", "segmentation" (COCO RLE), "area", "bbox" (xywh), "predicted_iou",
    "point_coords", "stability_score", "crop_box"}]}`` plus ``model``, ``checkpoint``,
    ``settings``, ``dtype``, ``num_masks``, ``mean_predicted_iou`` and ``seconds``. Settings
    and ``dtype`` are checked before the image and the model are loaded. Returns the content of ``masks.json``.
    """
    from ..models import create_model
    from .automatic import AutomaticMaskGenerator

    t_start = time.perf_counter()
    # Checked here, before the slow loading.
    amg = dataclasses.replace(settings or AmgSettings(), **{**overrides, "output_mode": "coco_rle"})
    from ..accel.precision import check_dtype

    dev = resolve_device(device)
    check_dtype(dtype, dev)
    output = Path(output)
    image = load_image(image_path)
    model = create_model(model_name, checkpoint=checkpoint, device=dev)
    generator = AutomaticMaskGenerator(model, amg, dtype=dtype)
    t0 = time.perf_counter()
    records = generator.generate(image, progress=progress)
    seconds = time.perf_counter() - t0

    from .amg_utils import rle_to_mask

    # Largest first, so that small masks stay visible on top of the large ones they sit in.
    by_area = sorted(range(len(records)), key=lambda i: -records[i]["area"])
    overlay = overlay_masks(image, [rle_to_mask(records[i]["segmentation"]) for i in by_area])
    output.mkdir(parents=True, exist_ok=True)
    _save_png(output / "overlay.png", overlay)
    result = {
        "image": {"file_name": str(image_path), "height": int(image.shape[0]), "width": int(image.shape[1])},
        "model": model.name,
        "checkpoint": checkpoint,
        "settings": amg.to_dict(),
        "dtype": dtype,
        "num_masks": len(records),
        "mean_predicted_iou": float(np.mean([r["predicted_iou"] for r in records])) if records else None,
        "seconds": {"generate": seconds, **generator.timings, "total": time.perf_counter() - t_start},
        "annotations": [{"id": i, **r} for i, r in enumerate(records)],
    }
    write_json_atomic(output / "masks.json", result)
    return result

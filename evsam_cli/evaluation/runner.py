"""The evaluation loop: zero-shot COCO / LVIS instance segmentation with box, click or detector prompts.

Speed comes from the structure, not from approximations:

* images are read, resized and their ground-truth masks decoded in reader threads while the
  model runs (``loader.read_batches``);
* on a GPU the encoder runs on ``batch_size`` images at once (every image is padded to the same
  square); on a CPU one image at a time is faster per image (its activations stay in cache);
* all prompts of an image go through the decoder in a few batched passes (``SamPredictor.predict_best``)
  instead of one call per box or per click.

Under ``torchrun`` each rank evaluates a contiguous, disjoint shard of the images
(``shard_indices``, never padded), and rank 0 gathers the per-instance results, restores the
single-process order and scores them, so the metrics equal a single-process run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

from ..errors import DataError, SettingError
from ..models import create_model
from ..models.sam import Sam
from ..predictor.sam_predictor import SamPredictor, default_prompts_per_pass
from ..utils import distributed as dist_utils
from ..utils.cores import default_workers
from ..utils.devices import resolve_device
from ..utils.io import write_json_atomic
from . import detectors as det
from .datasets import EvalDataset, bbox_xywh_to_xyxy, load_dataset
from .detectors import DetectorOptions
from .loader import EvalImages, EvalItem, read_batches
from .metrics import coco_segm_metrics, lvis_segm_metrics, mask_iou, miou_summary

log = logging.getLogger(__name__)

PROMPTS = ("box", "point", "detector")
Progress = Callable[[int, int], None]


@dataclass
class _ShardOutput:
    """What one rank sends to rank 0 (picklable, ordered by image index)."""

    records: list[tuple[int, int, float, float]] = field(default_factory=list)  # (image idx, k, area, iou)
    predictions: list[tuple[int, int, dict[str, Any]]] = field(default_factory=list)  # (image idx, k, result)
    detections: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    skipped: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    num_images: int = 0
    num_prompts: int = 0


def evaluate(
    *,
    dataset: str,
    output: str | Path,
    model: str | Sam = "efficientvit-sam-l0",
    checkpoint: str | None = None,
    prompt: str = "box",
    clicks: int = 1,
    detector: DetectorOptions | None = None,
    data_root: str | Path | None = None,
    images: str | Path | None = None,
    annotations: str | Path | None = None,
    limit: int | None = None,
    device: str = "cpu",
    batch_size: int | None = None,
    workers: int | None = None,
    prompts_per_pass: int | None = None,
    input_size: int | None = None,
    dtype: str = "fp32",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Evaluate a zoo model zero-shot; write ``OUTPUT/metrics.json`` (and ``predictions.json``).

    Args:
      dataset: "coco" or "lvis".
      model: a zoo name (built with ``checkpoint``), or an already built model on ``device``
        (``checkpoint`` is then only recorded).
      prompt: "box" (GT boxes), "point" (``clicks`` simulated clicks) or "detector".
      detector: box source for detector prompts.
      data_root / images / annotations: the standard layout, or explicit paths.
      limit: evaluate only the first N images of the annotation file.
      batch_size: images per encoder pass (default ``default_batch_size``).
      workers: threads reading images ahead of the model (default ``default_workers``: the
        cores less one, at most 4).
      prompts_per_pass: prompts per decoder pass (default ``default_prompts_per_pass``).
      input_size: encoder input override (EfficientViT-SAM only; for quick tests).
      dtype: the predictor's precision ("fp32", "bf16", "fp16"; ``SamPredictor``).
      progress: called on rank 0 with (images done, images in this rank's shard).
    Returns the metrics dict written to metrics.json (on every rank; only rank 0 writes).
    """
    start = time.perf_counter()
    if prompt not in PROMPTS:
        raise DataError(f"unknown prompt type {prompt!r}; choose one of {', '.join(PROMPTS)}")
    if prompt == "point" and clicks < 1:
        raise SettingError(f"clicks must be at least 1, got {clicks}", "clicks")
    detector = detector or DetectorOptions()
    if prompt == "detector":
        det.get_detector(detector.name)  # an unknown name fails before anything is loaded
    output = Path(output)
    dev = resolve_device(device)
    from ..accel.precision import check_dtype

    check_dtype(dtype, dev)  # before data and model are loaded
    info = dist_utils.init_distributed(dev)
    if dev.type == "cuda" and info.distributed:
        dev = torch.device("cuda", info.local_rank)

    data = load_dataset(dataset, data_root=data_root, images=images, annotations=annotations, limit=limit)
    boxes_by_image, make_detector = (
        _detector_boxes(data, detector, output) if prompt == "detector" else ({}, None)
    )
    run_detector = make_detector(dev) if make_detector is not None else None
    if isinstance(model, Sam):
        sam = model.to(dev).eval()
    else:
        sam = create_model(model, checkpoint, dev, input_size=input_size)
    if prompts_per_pass is None:
        prompts_per_pass = default_prompts_per_pass(dev)
    # Everything decodes through the predictor (and its encoder's inference copy runs the images).
    predictor = SamPredictor(sam, max_prompts_per_pass=prompts_per_pass, dtype=dtype)

    shard = dist_utils.shard_indices(len(data), info.rank, info.world_size)
    items = EvalImages(
        images=data.images,
        indices=shard,
        annotations=data.annotations,
        input_size=sam.input_size,
        interpolation=sam.interpolation,
        with_gt=prompt != "detector",
        keep_rgb=run_detector is not None,
    )
    part = _ShardOutput()
    done = 0
    # closing: an error mid-loop stops the reader threads at once, not when the generator is collected.
    with closing(
        read_batches(
            items,
            default_batch_size(dev) if batch_size is None else batch_size,
            default_workers() if workers is None else workers,
        )
    ) as loader:
        for batch in loader:
            for item in batch:
                if item.fatal:
                    raise DataError(item.fatal)
                if item.error:
                    log.warning("skipping image %s: %s", item.image.image_id, item.error)
                    part.skipped.append((item.index, _skip_entry(item)))
            ok = [item for item in batch if item.error is None]
            # Images without a single prompt (no annotations, no boxes) need no embedding.
            todo = [item for item in ok if _has_prompts(item, prompt, boxes_by_image, run_detector)]
            embeddings = _encode(predictor, todo) if todo else None
            for item in ok:
                j = next((k for k, t in enumerate(todo) if t is item), None)
                _evaluate_image(
                    predictor,
                    None if j is None or embeddings is None else embeddings[j : j + 1],
                    item,
                    prompt,
                    clicks,
                    boxes_by_image,
                    run_detector,
                    part,
                    prompts_per_pass,
                )
                part.num_images += 1
            done += len(batch)
            if progress is not None and info.is_main:
                progress(done, len(items))

    parts = dist_utils.all_gather_objects(part)
    metrics: dict[str, Any] = {}
    if info.is_main:
        metrics = _score(
            data,
            parts,
            prompt=prompt,
            detector=detector,
            model=sam,
            checkpoint=checkpoint,
            output=output,
            start=start,
            dtype=dtype,
        )
    metrics = dist_utils.broadcast_object(metrics)
    return metrics


def default_batch_size(device: torch.device) -> int:
    """Images per encoder pass: 4 on a GPU; 1 on a CPU, where a batch's activations outgrow the
    caches and the encoder takes longer per image (docs/benchmarks.md)."""
    return 4 if device.type == "cuda" else 1


# ---------------------------------------------------------------------------- per image
def _has_prompts(
    item: EvalItem, prompt: str, boxes_by_image: dict[int, list[dict[str, Any]]], live: det.Detector | None
) -> bool:
    if prompt != "detector":
        return item.gt_masks is not None and len(item.gt_masks) > 0
    return live is not None or bool(boxes_by_image.get(item.image.image_id))


def _encode(predictor: SamPredictor, items: list[EvalItem]) -> torch.Tensor:
    """Encoder inputs of several images (each resized already) -> (B, 256, 64, 64)."""
    model = predictor.model
    with torch.inference_mode():
        x = torch.cat(
            [model.normalize_and_pad(it.encoder_input.to(model.device).float().unsqueeze(0)) for it in items]  # type: ignore[union-attr]
        )
        return predictor.backend.encode(x)


def _evaluate_image(
    predictor: SamPredictor,
    embedding: torch.Tensor | None,
    item: EvalItem,
    prompt: str,
    clicks: int,
    boxes_by_image: dict[int, list[dict[str, Any]]],
    run_detector: det.Detector | None,
    part: _ShardOutput,
    chunk: int,
) -> None:
    size = item.original_size
    if prompt == "detector":
        image_id = item.image.image_id
        if run_detector is not None:
            assert item.rgb is not None
            dets = run_detector(item.rgb)
            part.detections[image_id] = dets
        else:
            dets = boxes_by_image.get(image_id, [])
        part.num_prompts += len(dets)
        if not dets:
            return
        assert embedding is not None
        boxes = np.array([bbox_xywh_to_xyxy(d["bbox"]) for d in dets], dtype=np.float64)
        predictor.set_embedding(embedding, size)
        masks = predictor.predict_best(boxes=boxes, max_prompts_per_pass=chunk).cpu().numpy()
        rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
        for k, (d, rle) in enumerate(zip(dets, rles, strict=True)):
            seg = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
            result = {
                "image_id": image_id,
                "category_id": d["category_id"],
                "segmentation": seg,
                "score": d["score"],
            }
            part.predictions.append((item.index, k, result))
        return

    assert item.gt_masks is not None and item.gt_boxes is not None and item.gt_areas is not None
    n = len(item.gt_masks)
    part.num_prompts += n
    if n == 0:
        return
    assert embedding is not None
    predictor.set_embedding(embedding, size)
    if prompt == "box":
        pred = predictor.predict_best(boxes=item.gt_boxes, max_prompts_per_pass=chunk)
    else:
        pred = _click_rounds(predictor, item.gt_masks, clicks, chunk)
    ious = mask_iou(pred, torch.from_numpy(item.gt_masks).to(pred.device)).tolist()
    part.records.extend((item.index, k, item.gt_areas[k], ious[k]) for k in range(n))


def _click_rounds(predictor: SamPredictor, gt_masks: np.ndarray, clicks: int, chunk: int) -> torch.Tensor:
    """``clicks`` rounds of the official click rule for all objects of an image at once."""
    from .clicker import Clicker

    clickers = [Clicker(m) for m in gt_masks]
    pred = np.zeros_like(gt_masks)
    masks = torch.from_numpy(pred)
    for _ in range(clicks):
        for clicker, p in zip(clickers, pred, strict=True):
            clicker.make_next_click(p)
        coords, labels = zip(*(c.points() for c in clickers), strict=True)
        masks = predictor.predict_best(
            point_coords=np.stack(coords), point_labels=np.stack(labels), max_prompts_per_pass=chunk
        )
        pred = masks.cpu().numpy()
    return masks


def _skip_entry(item: EvalItem) -> dict[str, Any]:
    return {"image_id": item.image.image_id, "file": str(item.image.path), "reason": item.error}


# ---------------------------------------------------------------------------- detector boxes
def _detector_boxes(
    data: EvalDataset, options: DetectorOptions, output: Path
) -> tuple[dict[int, list[dict[str, Any]]], Callable[[torch.device], det.Detector] | None]:
    """Boxes from a file (ViTDet's, or a detector's cache), or a factory for a live detector."""
    name = options.name
    source = det.get_detector(name)
    if not source.live:
        if options.detections is None:
            raise SettingError(
                f"detector {name} needs detections: a COCO-results JSON of boxes (e.g. ViTDet's)",
                "detector",
                "detections",
            )
        return _read_boxes(data, options.detections), None
    cache = options.detections or output / f"detections_{name}.json"
    if Path(cache).is_file():
        log.info("reusing cached %s detections from %s (delete it to detect again)", name, cache)
        return _read_boxes(data, Path(cache)), None
    if options.weights is None and source.default_weights is None:
        raise SettingError(
            f"detector {name} needs weights (or a cached detections JSON)",
            "detector",
            "weights",
            "detections",
        )

    def build(device: torch.device) -> det.Detector:
        return source.from_options(
            options, categories=data.categories, device=device, lvis=data.name == "lvis"
        )

    return {}, build


def _read_boxes(data: EvalDataset, path: Path) -> dict[int, list[dict[str, Any]]]:
    known = [int(im["id"]) for im in data.gt["images"]]
    boxes, unknown = det.read_detections(path, image_ids=data.image_ids, known_ids=known)
    if unknown:
        shown = ", ".join(str(k) for k in list(unknown)[:5])
        log.warning(
            "%d detections in %s are for image ids not in %s (%s%s); dropped",
            sum(unknown.values()),
            path,
            data.annotation_file,
            shown,
            ", ..." if len(unknown) > 5 else "",
        )
    return boxes


# ---------------------------------------------------------------------------- scoring (rank 0)
def _score(
    data: EvalDataset,
    parts: list[_ShardOutput],
    *,
    prompt: str,
    detector: DetectorOptions,
    model: Sam,
    checkpoint: str | None,
    output: Path,
    start: float,
    dtype: str = "fp32",
) -> dict[str, Any]:
    records = sorted(r for p in parts for r in p.records)
    skipped = [entry for _, entry in sorted((s for p in parts for s in p.skipped), key=lambda s: s[0])]
    skipped_ids = {s["image_id"] for s in skipped}
    evaluated = [i for i in data.image_ids if i not in skipped_ids]
    miou = segm = None
    if prompt == "detector":
        ordered = [
            pred for _, _, pred in sorted((x for p in parts for x in p.predictions), key=lambda x: x[:2])
        ]
        write_json_atomic(output / "predictions.json", ordered, indent=None)
        detected: dict[int, list[dict[str, Any]]] = {}
        for p in parts:
            detected.update(p.detections)
        if detected:  # a live detector ran: cache its boxes for the next run
            cache = detector.detections or output / f"detections_{detector.name}.json"
            det.write_detections(cache, detected, data.image_ids)
        if data.name == "lvis":
            segm = lvis_segm_metrics(data.annotation_file, ordered, image_ids=evaluated)
        else:
            segm = coco_segm_metrics(data.gt, ordered, image_ids=evaluated)
    else:
        miou = miou_summary([r[2] for r in records], [r[3] for r in records])
    num_images = sum(p.num_images for p in parts)
    seconds = time.perf_counter() - start
    metrics = {
        "dataset": data.name,
        "prompt": prompt,
        "detector": detector.name if prompt == "detector" else None,
        "model": model.name,
        "checkpoint": checkpoint,
        "dtype": dtype,
        "num_images": num_images,
        "num_prompts": sum(p.num_prompts for p in parts),
        "miou": miou,
        "segm": segm,
        "seconds": round(seconds, 3),
        "images_per_s": round(num_images / seconds, 3) if seconds > 0 else None,
        "skipped_images": skipped,
    }
    write_json_atomic(output / "metrics.json", metrics)
    return metrics

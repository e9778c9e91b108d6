"""Small procedurally generated datasets in the real COCO, LVIS and SA-1B formats.

Every image is a textured background with a few textured shapes (ellipses, polygons, rings,
rectangles) painted back to front. Instance masks are exact: each annotation decodes (with
pycocotools) to precisely the visible pixels of its object. The annotations mix every
segmentation encoding the real datasets use: polygons (for unoccluded polygon shapes),
compressed RLE and uncompressed RLE.

Layouts written:

* ``coco``: ``val2017/<id:012d>.jpg``, ``annotations/instances_val2017.json``,
  ``annotations/lvis_v1_val.json`` (same images, LVIS v1 fields, ``coco_url`` pointing into
  val2017) and ``annotations/detections_val2017.json`` (COCO results with jittered boxes and a
  few false positives, the shape of ViTDet's published box files).
* ``sa1b``: ``sa_<id>.jpg`` + ``sa_<id>.json`` pairs, or ``sa_<shard:06d>.tar`` shards of them.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from ..utils.io import atomic_path, write_json_atomic

# A few real COCO categories (real ids) with the shape used to draw them.
CATEGORIES: list[dict[str, Any]] = [
    {"id": 1, "name": "person", "supercategory": "person", "shape": "ellipse", "frequency": "f"},
    {"id": 3, "name": "car", "supercategory": "vehicle", "shape": "rectangle", "frequency": "f"},
    {"id": 18, "name": "dog", "supercategory": "animal", "shape": "polygon", "frequency": "c"},
    {"id": 44, "name": "bottle", "supercategory": "kitchen", "shape": "ring", "frequency": "c"},
    {"id": 62, "name": "chair", "supercategory": "furniture", "shape": "polygon", "frequency": "r"},
]


@dataclass
class SynthObject:
    category_id: int
    shape: str
    mask: np.ndarray  # full (unoccluded) mask, bool HxW
    polygon: list[float] | None  # flat x,y list when the shape is a polygon


def _polygon_mask(poly: list[float], h: int, w: int) -> np.ndarray:
    rles = mask_utils.frPyObjects([poly], h, w)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def _random_object(
    rng: np.random.Generator, h: int, w: int, category: dict[str, Any], scale: float
) -> SynthObject:
    cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
    r = scale * min(h, w)
    shape = category["shape"]
    yy, xx = np.mgrid[0:h, 0:w]
    polygon = None
    if shape == "ellipse":
        a, b = r * rng.uniform(0.6, 1.0), r * rng.uniform(0.35, 0.8)
        t = rng.uniform(0, np.pi)
        dx, dy = xx + 0.5 - cx, yy + 0.5 - cy
        u = dx * np.cos(t) + dy * np.sin(t)
        v = -dx * np.sin(t) + dy * np.cos(t)
        mask = (u / a) ** 2 + (v / b) ** 2 <= 1.0
    elif shape == "ring":
        outer = r * rng.uniform(0.6, 1.0)
        inner = outer * rng.uniform(0.35, 0.6)
        d2 = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2
        mask = (d2 <= outer**2) & (d2 >= inner**2)
    elif shape == "rectangle":
        hw, hh = r * rng.uniform(0.5, 1.0), r * rng.uniform(0.3, 0.7)
        x0, x1 = int(max(0, cx - hw)), int(min(w, cx + hw))
        y0, y1 = int(max(0, cy - hh)), int(min(h, cy + hh))
        mask = np.zeros((h, w), dtype=bool)
        mask[y0:y1, x0:x1] = True
    else:  # star-shaped random polygon
        n = int(rng.integers(5, 10))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = r * rng.uniform(0.45, 1.0, n)
        px = np.clip(cx + radii * np.cos(angles), 0, w - 1)
        py = np.clip(cy + radii * np.sin(angles), 0, h - 1)
        polygon = [float(round(v, 2)) for xy in zip(px, py, strict=True) for v in xy]
        mask = _polygon_mask(polygon, h, w)
    return SynthObject(category["id"], shape, mask, polygon)


def _texture(rng: np.random.Generator, h: int, w: int, base: np.ndarray, amplitude: float) -> np.ndarray:
    """Smooth random texture around an RGB ``base`` colour: (h, w, 3) float."""
    small = rng.normal(0, 1, (max(2, h // 16), max(2, w // 16), 3)).astype(np.float32)
    up = np.asarray(
        Image.fromarray(((small * 40) + 128).clip(0, 255).astype(np.uint8)).resize(
            (w, h), Image.Resampling.BICUBIC
        )
    )
    noise = (up.astype(np.float32) - 128) / 40 + rng.normal(0, 0.25, (h, w, 3))
    return base[None, None, :] + amplitude * noise


def synth_image(
    rng: np.random.Generator, height: int, width: int, num_objects: int
) -> tuple[np.ndarray, list[SynthObject], list[np.ndarray]]:
    """One image, its objects (back to front) and each object's visible mask."""
    bg = rng.uniform(40, 215, 3)
    image = _texture(rng, height, width, bg, 18.0)
    objects: list[SynthObject] = []
    for _ in range(num_objects):
        category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        # Mix object sizes so COCO's small / medium / large buckets are all populated.
        scale = float(rng.choice([0.04, 0.12, 0.42], p=[0.3, 0.35, 0.35]))
        obj = _random_object(rng, height, width, category, scale)
        if obj.mask.sum() < 4:
            continue
        color = rng.uniform(0, 255, 3)
        while np.abs(color - bg).sum() < 120:
            color = rng.uniform(0, 255, 3)
        tex = _texture(rng, height, width, color, 10.0)
        image[obj.mask] = tex[obj.mask]
        objects.append(obj)
    visible = []
    covered = np.zeros((height, width), dtype=bool)
    for obj in reversed(objects):
        visible.append(obj.mask & ~covered)
        covered |= obj.mask
    visible.reverse()
    return np.clip(image, 0, 255).astype(np.uint8), objects, visible


def _bbox_xywh(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _segmentation(obj: SynthObject, visible: np.ndarray, index: int) -> dict[str, Any] | list[list[float]]:
    """Polygon when exact (unoccluded polygon shape), else compressed or uncompressed RLE."""
    if obj.polygon is not None and np.array_equal(visible, obj.mask):
        return [obj.polygon]
    fortran = np.asfortranarray(visible.astype(np.uint8))
    if index % 3 == 2:
        # Uncompressed RLE: run lengths in column-major order, starting with a zero run.
        flat = visible.T.reshape(-1).astype(np.int8)
        change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
        counts = np.diff(np.concatenate([[0], change])).tolist()
        return {"size": list(visible.shape), "counts": [int(c) for c in counts]}
    rle = mask_utils.encode(fortran)
    return {"size": list(visible.shape), "counts": rle["counts"].decode("ascii")}


def _save_jpeg(path: Path, image: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="JPEG", quality=95)


def _image_sizes(rng: np.random.Generator, n: int, size: int) -> list[tuple[int, int]]:
    out = []
    for _ in range(n):
        long_side = int(size * rng.uniform(0.8, 1.0))
        short = int(long_side * rng.uniform(0.6, 1.0))
        out.append((short, long_side) if rng.random() < 0.7 else (long_side, short))
    return out


def write_coco(
    output: str | Path,
    *,
    num_images: int = 8,
    image_size: int = 320,
    objects_per_image: tuple[int, int] = (3, 7),
    seed: int = 0,
) -> dict[str, Path]:
    """Write a COCO val2017-style dataset (plus LVIS annotations and a detections file).

    Returns the paths of ``images``, ``annotations`` (COCO), ``lvis`` and ``detections``.
    """
    root = Path(output)
    rng = np.random.default_rng(seed)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    lvis_annotations: list[dict[str, Any]] = []
    detections: list[dict[str, Any]] = []
    ann_id = 1
    for i, (h, w) in enumerate(_image_sizes(rng, num_images, image_size)):
        image_id = 100 + 7 * i  # ids are not 0..n-1, as in the real sets
        file_name = f"{image_id:012d}.jpg"
        image, objects, visible = synth_image(rng, h, w, int(rng.integers(*objects_per_image, endpoint=True)))
        _save_jpeg(root / "val2017" / file_name, image)
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w, "license": 1})
        present: set[int] = set()
        for obj, vis in zip(objects, visible, strict=True):
            if vis.sum() < 1:
                continue
            seg = _segmentation(obj, vis, ann_id)
            ann: dict[str, Any] = {
                "id": ann_id,
                "image_id": image_id,
                "category_id": obj.category_id,
                "segmentation": seg,
                "area": float(vis.sum()),
                "bbox": _bbox_xywh(vis),
                "iscrowd": 0,
            }
            annotations.append(ann)
            # LVIS v1 annotations have no iscrowd field; its API decodes polygons and RLE alike.
            lvis_annotations.append({k: v for k, v in ann.items() if k != "iscrowd"})
            present.add(obj.category_id)
            jitter = rng.normal(0, 0.04, 4) * np.array([ann["bbox"][2], ann["bbox"][3]] * 2)
            x, y, bw, bh = (np.array(ann["bbox"]) + jitter).tolist()
            x, y = max(0.0, x), max(0.0, y)
            detections.append(
                {
                    "image_id": image_id,
                    "category_id": obj.category_id,
                    "bbox": [
                        round(x, 2),
                        round(y, 2),
                        round(max(1.0, min(bw, w - x)), 2),
                        round(max(1.0, min(bh, h - y)), 2),
                    ],
                    "score": round(float(rng.uniform(0.5, 0.99)), 4),
                }
            )
            ann_id += 1
        # A low-scoring false positive per image.
        fx, fy = float(rng.uniform(0, w / 2)), float(rng.uniform(0, h / 2))
        detections.append(
            {
                "image_id": image_id,
                "category_id": CATEGORIES[int(rng.integers(len(CATEGORIES)))]["id"],
                "bbox": [round(fx, 2), round(fy, 2), round(w / 5, 2), round(h / 5, 2)],
                "score": round(float(rng.uniform(0.05, 0.3)), 4),
            }
        )
        images[-1]["_present"] = sorted(present)

    categories = [{k: c[k] for k in ("id", "name", "supercategory")} for c in CATEGORIES]
    coco = {
        "info": {"description": "evsam synthetic COCO-format dataset", "version": "1.0", "year": 2026},
        "licenses": [{"id": 1, "name": "CC0", "url": ""}],
        "images": [{k: v for k, v in im.items() if not k.startswith("_")} for im in images],
        "annotations": annotations,
        "categories": categories,
    }
    all_ids = [c["id"] for c in CATEGORIES]
    lvis_images = []
    for im in images:
        absent = [c for c in all_ids if c not in im["_present"]]
        lvis_images.append(
            {
                "id": im["id"],
                "height": im["height"],
                "width": im["width"],
                "coco_url": f"http://images.cocodataset.org/val2017/{im['file_name']}",
                "license": 1,
                "neg_category_ids": absent[:1],
                "not_exhaustive_category_ids": [],
            }
        )
    counts: dict[int, set[int]] = {}
    for ann in lvis_annotations:
        counts.setdefault(ann["category_id"], set()).add(ann["image_id"])
    lvis = {
        "info": coco["info"],
        "licenses": coco["licenses"],
        "images": lvis_images,
        "annotations": lvis_annotations,
        "categories": [
            {
                "id": c["id"],
                "name": c["name"],
                "synset": f"{c['name']}.n.01",
                "synonyms": [c["name"]],
                "def": c["name"],
                "frequency": c["frequency"],
                "image_count": len(counts.get(c["id"], ())),
                "instance_count": sum(1 for a in lvis_annotations if a["category_id"] == c["id"]),
            }
            for c in CATEGORIES
        ],
    }
    paths = {
        "images": root / "val2017",
        "annotations": root / "annotations" / "instances_val2017.json",
        "lvis": root / "annotations" / "lvis_v1_val.json",
        "detections": root / "annotations" / "detections_val2017.json",
    }
    write_json_atomic(paths["annotations"], coco, indent=None)
    write_json_atomic(paths["lvis"], lvis, indent=None)
    write_json_atomic(paths["detections"], detections, indent=None)
    return paths


def _sa1b_record(
    rng: np.random.Generator,
    image_id: int,
    h: int,
    w: int,
    objects: list[SynthObject],
    visible: list[np.ndarray],
) -> dict[str, Any]:
    anns = []
    for k, vis in enumerate(visible):
        if vis.sum() < 1:
            continue
        rle = mask_utils.encode(np.asfortranarray(vis.astype(np.uint8)))
        ys, xs = np.nonzero(vis)
        j = int(rng.integers(len(xs)))
        anns.append(
            {
                "id": image_id * 1000 + k,
                "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                "bbox": _bbox_xywh(vis),
                "area": int(vis.sum()),
                "predicted_iou": round(float(rng.uniform(0.85, 1.0)), 4),
                "point_coords": [[float(xs[j]) + 0.5, float(ys[j]) + 0.5]],
                "stability_score": round(float(rng.uniform(0.9, 1.0)), 4),
                "crop_box": [0.0, 0.0, float(w), float(h)],
            }
        )
    return {
        "image": {"image_id": image_id, "width": w, "height": h, "file_name": f"sa_{image_id}.jpg"},
        "annotations": anns,
    }


def write_sa1b(
    output: str | Path,
    *,
    num_images: int = 8,
    image_size: int = 320,
    objects_per_image: tuple[int, int] = (3, 7),
    shards: int = 0,
    seed: int = 0,
) -> list[Path]:
    """Write SA-1B-style ``sa_<id>.jpg``/``sa_<id>.json`` pairs, or ``shards`` tar files of them.

    Returns the written files (the pairs' JSON files, or the tar shards).
    """
    root = Path(output)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    samples: list[tuple[int, bytes, bytes]] = []
    for i, (h, w) in enumerate(_image_sizes(rng, num_images, image_size)):
        image_id = i + 1
        image, objects, visible = synth_image(rng, h, w, int(rng.integers(*objects_per_image, endpoint=True)))
        record = _sa1b_record(rng, image_id, h, w, objects, visible)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=95)
        samples.append((image_id, buf.getvalue(), json.dumps(record).encode("utf-8")))

    written: list[Path] = []
    if shards <= 0:
        for image_id, jpg, js in samples:
            for suffix, data in ((".jpg", jpg), (".json", js)):
                path = root / f"sa_{image_id}{suffix}"
                with atomic_path(path) as tmp:
                    tmp.write_bytes(data)
            written.append(root / f"sa_{image_id}.json")
        return written
    for s in range(shards):
        path = root / f"sa_{s:06d}.tar"
        with atomic_path(path) as tmp, tarfile.open(tmp, "w") as tar:
            for image_id, jpg, js in samples[s::shards]:
                for suffix, data in ((".jpg", jpg), (".json", js)):
                    info = tarfile.TarInfo(f"./sa_{image_id}{suffix}")
                    info.size = len(data)
                    info.mtime = 0
                    tar.addfile(info, io.BytesIO(data))
        written.append(path)
    return written

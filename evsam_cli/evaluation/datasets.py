"""COCO and LVIS v1 instance annotations, read once and indexed by image id.

The image set is the annotation file's ``images`` list, in file order. COCO images live in one
folder (``file_name``); LVIS images are found from ``coco_url`` under a root that holds
``train2017/`` and ``val2017/``, as the official EfficientViT-SAM evaluation does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from ..errors import DataError

DATASETS = ("coco", "lvis")
STANDARD_ANNOTATIONS = {
    "coco": Path("annotations") / "instances_val2017.json",
    "lvis": Path("annotations") / "lvis_v1_val.json",
}


@dataclass(frozen=True)
class EvalImage:
    image_id: int
    path: Path
    height: int
    width: int


@dataclass
class EvalDataset:
    """An instance-segmentation ground truth: images (file order) and annotations by image id."""

    name: str  # "coco" or "lvis"
    annotation_file: Path
    images: list[EvalImage]
    annotations: dict[int, list[dict[str, Any]]]
    categories: list[dict[str, Any]]
    gt: dict[str, Any] = field(repr=False)  # the parsed JSON, for COCOeval / LVISEval

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_ids(self) -> list[int]:
        return [im.image_id for im in self.images]


def resolve_paths(
    name: str,
    *,
    data_root: str | Path | None = None,
    images: str | Path | None = None,
    annotations: str | Path | None = None,
) -> tuple[Path, Path]:
    """(image folder, annotation JSON) from ``data_root`` or ``images``/``annotations``.

    ``images``/``annotations`` override the standard layout under ``data_root``:
    ``val2017/`` and ``annotations/instances_val2017.json`` (COCO), the root itself and
    ``annotations/lvis_v1_val.json`` (LVIS).
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if data_root is None and (images is None or annotations is None):
        raise DataError("give data_root, or both images and annotations").naming(
            "data_root", "images", "annotations"
        )
    root = Path(data_root) if data_root is not None else None
    if root is not None and not root.is_dir():
        raise DataError(
            f"data_root is not a folder: {root} (give data_root, or images and annotations)"
        ).naming("data_root", "images", "annotations")
    if images is not None:
        image_dir = Path(images)
    else:
        assert root is not None  # checked above: one of the two is given
        image_dir = root / "val2017" if name == "coco" else root
    if annotations is not None:
        ann_file = Path(annotations)
    else:
        assert root is not None
        ann_file = root / STANDARD_ANNOTATIONS[name]
    if not image_dir.is_dir():
        raise DataError(f"image folder not found: {image_dir}")
    if not ann_file.is_file():
        raise DataError(f"annotation file not found: {ann_file}")
    return image_dir, ann_file


def read_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(f"malformed JSON in {what} {path}: {exc}") from None
    except UnicodeDecodeError:
        raise DataError(f"{what} {path} is not a JSON text file") from None


def _check_instances(data: Any, path: Path, name: str) -> None:
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), list) for k in ("images", "annotations", "categories")
    ):
        raise DataError(
            f"{path} is not {'an LVIS' if name == 'lvis' else 'a COCO'} instance annotation file (needs 'images', 'annotations' and 'categories' lists)"
        )
    need_image = ("id", "coco_url" if name == "lvis" else "file_name")
    for im in data["images"][:1] + data["images"][-1:]:
        if not isinstance(im, dict) or any(k not in im for k in need_image):
            raise DataError(
                f"{path}: every image needs {' and '.join(repr(k) for k in need_image)} ({name.upper()} format)"
            )
    for ann in data["annotations"][:1] + data["annotations"][-1:]:
        if not isinstance(ann, dict) or any(
            k not in ann for k in ("image_id", "bbox", "segmentation", "area")
        ):
            raise DataError(f"{path}: annotations need 'image_id', 'bbox', 'segmentation' and 'area'")


def _image_path(name: str, image_dir: Path, im: dict[str, Any]) -> Path:
    if name == "lvis":
        parts = str(im["coco_url"]).rstrip("/").split("/")
        return image_dir / parts[-2] / parts[-1]
    return image_dir / str(im["file_name"])


def load_dataset(
    name: str,
    *,
    data_root: str | Path | None = None,
    images: str | Path | None = None,
    annotations: str | Path | None = None,
    limit: int | None = None,
) -> EvalDataset:
    """Read a COCO or LVIS v1 annotation file; ``limit`` keeps the first N images.

    Raises ``DataError`` for missing folders/files and JSON that is not in the dataset's format.
    """
    image_dir, ann_file = resolve_paths(name, data_root=data_root, images=images, annotations=annotations)
    data = read_json(ann_file, "annotation file")
    _check_instances(data, ann_file, name)
    raw_images = data["images"] if limit is None else data["images"][: max(0, int(limit))]
    eval_images = []
    for im in raw_images:
        try:
            eval_images.append(
                EvalImage(
                    int(im["id"]),
                    _image_path(name, image_dir, im),
                    int(im.get("height", 0)),
                    int(im.get("width", 0)),
                )
            )
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{ann_file}: malformed image entry {str(im)[:120]}") from None
    by_image: dict[int, list[dict[str, Any]]] = {im.image_id: [] for im in eval_images}
    for ann in data["annotations"]:  # one pass over the annotations, never one per image
        bucket = by_image.get(ann.get("image_id"))
        if bucket is not None:
            bucket.append(ann)
    return EvalDataset(
        name=name,
        annotation_file=ann_file,
        images=eval_images,
        annotations=by_image,
        categories=list(data["categories"]),
        gt=data,
    )


def bbox_xywh_to_xyxy(bbox: list[float]) -> list[float]:
    x, y, w, h = (float(v) for v in bbox)
    return [x, y, x + w, y + h]


def annotation_to_mask(ann: dict[str, Any], height: int, width: int) -> np.ndarray:
    """An annotation's ``segmentation`` (polygons, RLE or uncompressed RLE) -> (H, W) bool mask."""
    seg = ann["segmentation"]
    try:
        if isinstance(seg, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width)) if seg else None
            if rle is None:
                return np.zeros((height, width), dtype=bool)
        elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):
            rle = mask_utils.frPyObjects(seg, height, width)
        elif isinstance(seg, dict) and isinstance(seg.get("counts"), (str, bytes)):
            counts = seg["counts"]
            rle = {
                "size": list(seg["size"]),
                "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
            }
        else:
            raise TypeError(type(seg).__name__)
        mask = mask_utils.decode(rle)
    except (TypeError, ValueError, KeyError) as exc:
        raise DataError(f"annotation {ann.get('id')} has a malformed segmentation ({exc})") from None
    if mask.shape != (height, width):
        raise DataError(
            f"annotation {ann.get('id')}: segmentation is {mask.shape[0]}x{mask.shape[1]} but the image is {height}x{width}"
        )
    return mask > 0

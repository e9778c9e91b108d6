"""COCO-format instance data as a training source, for finetuning on a user's own domain.

``open_coco(images, annotations)`` gives the same interface as ``open_sa1b``: units that the
``Sa1bStream`` splits across ranks and workers, and a held-out slice (the last ``val_images``
images in id order; without ``val_images``, ``auto_val_images`` of them). Each unit is one image; its annotations travel with it in SA-1B's JSON
shape, so the training transform cannot tell the formats apart. Crowd annotations
(``iscrowd: 1``) are left out, as in COCO training; segmentations are polygons or RLE
(decoded with pycocotools).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..errors import DataError
from .sa1b import Sa1bSource, Unit, check_val_images

log = logging.getLogger("evsam.data")


def open_coco(
    images: str | os.PathLike[str], annotations: str | os.PathLike[str], *, val_images: int | None = 0
) -> Sa1bSource:
    """Read a COCO instances JSON; image files are ``images / file_name``.

    ``val_images``: images held out for validation; ``None`` chooses ``auto_val_images``.
    Raises ``DataError`` for a missing folder/file, malformed JSON, or no annotated image, and
    ``SettingError`` when the validation slice would take every training image.
    """
    root, ann_path = Path(images).expanduser(), Path(annotations).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    if not ann_path.is_file():
        raise DataError(f"annotation file not found: {ann_path}")
    try:
        data = json.loads(ann_path.read_text())
        image_list = data["images"]
        ann_list = data["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{ann_path} is not a COCO instances file ({type(exc).__name__}: {exc})") from None
    by_image: dict[int, list[dict]] = {}
    for ann in ann_list:
        if ann.get("iscrowd", 0) or "segmentation" not in ann:
            continue
        by_image.setdefault(int(ann["image_id"]), []).append(
            {k: ann[k] for k in ("id", "segmentation", "bbox", "area") if k in ann}
        )
    units, missing = [], []
    for im in sorted(image_list, key=lambda im: int(im["id"])):
        anns = by_image.get(int(im["id"]))
        if not anns:
            continue
        path = root / im["file_name"]
        if not path.is_file():
            missing.append(im["file_name"])
            continue
        meta = {"image_id": int(im["id"]), "width": im.get("width"), "height": im.get("height")}
        units.append(Unit(path, False, record=json.dumps({"image": meta, "annotations": anns}).encode()))
    if not units:
        raise DataError(f"no annotated images of {ann_path} found under {root}")
    val_images = check_val_images(val_images, len(units), f"{ann_path} (annotated, found under {root})")
    cut = len(units) - val_images
    if val_images:
        log.info("validation: %d of %d annotated image(s) held out (the last by id)", val_images, len(units))
    return Sa1bSource(
        root=root,
        train_units=tuple(units[:cut]),
        val_unit_list=tuple(units[cut:]),
        val_images=val_images,
        is_tar=False,
        missing=tuple(missing),
    )

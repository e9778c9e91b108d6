"""mIoU buckets, COCO/LVIS mask AP (perfect and hand-computed cases) and GT mask decoding."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from evsam_cli.data.synthetic import write_coco
from evsam_cli.evaluation.datasets import annotation_to_mask, load_dataset
from evsam_cli.evaluation.metrics import (
    coco_segm_metrics,
    import_lvis,
    lvis_segm_metrics,
    mask_iou,
    miou_summary,
)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    write_coco(root, num_images=4, image_size=96, seed=3)
    return root


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def test_mask_iou_percent_and_empty_union():
    a = np.zeros((3, 4, 4), dtype=bool)
    b = np.zeros((3, 4, 4), dtype=bool)
    a[0, :2] = True  # 8 px
    b[0, :1] = True  # 4 px inside -> 50 %
    a[1] = True
    b[1] = True  # identical -> 100 %
    # a[2], b[2] both empty -> 0
    assert mask_iou(a, b).tolist() == [50.0, 100.0, 0.0]


def test_miou_buckets_inclusive_bounds_and_empty_bucket():
    areas = [10.0, 1024.0, 5000.0, 9216.0]
    ious = [10.0, 20.0, 30.0, 40.0]
    out = miou_summary(areas, ious)
    assert out["all"] == pytest.approx(25.0)
    assert out["small"] == pytest.approx(15.0)  # 10 and the instance exactly at 32^2
    assert out["medium"] == pytest.approx(30.0)  # 1024, 5000, 9216
    assert out["large"] == pytest.approx(40.0)  # exactly 96^2
    assert miou_summary([10.0], [50.0])["large"] is None


def test_segmentation_formats_decode_to_the_stored_area(synth):
    data = load_dataset("coco", data_root=synth)
    kinds = set()
    for im in data.images:
        for ann in data.annotations[im.image_id]:
            seg = ann["segmentation"]
            kinds.add("polygon" if isinstance(seg, list) else type(seg["counts"]).__name__)
            mask = annotation_to_mask(ann, im.height, im.width)
            assert mask.dtype == bool and int(mask.sum()) == int(ann["area"])
    assert kinds == {"polygon", "str", "list"}  # polygons, compressed and uncompressed RLE


def _gt_predictions(data) -> list[dict]:
    preds = []
    for im in data.images:
        for ann in data.annotations[im.image_id]:
            mask = annotation_to_mask(ann, im.height, im.width)
            preds.append(
                {
                    "image_id": im.image_id,
                    "category_id": ann["category_id"],
                    "segmentation": _rle(mask),
                    "score": 1.0,
                }
            )
    return preds


def test_coco_ap_of_perfect_masks_is_100(synth):
    data = load_dataset("coco", data_root=synth)
    out = coco_segm_metrics(data.gt, _gt_predictions(data), image_ids=data.image_ids)
    assert out["AP"] == pytest.approx(100.0) and out["AP50"] == pytest.approx(100.0)
    assert out["AP75"] == pytest.approx(100.0)


def test_coco_ap_scores_only_the_evaluated_images(synth):
    data = load_dataset("coco", data_root=synth)
    first_two = data.image_ids[:2]
    preds = [p for p in _gt_predictions(data) if p["image_id"] in first_two]
    assert coco_segm_metrics(data.gt, preds, image_ids=first_two)["AP"] == pytest.approx(100.0)
    assert coco_segm_metrics(data.gt, preds)["AP"] < 100.0  # the other images' objects are misses


def test_coco_ap_hand_computed_imperfect_case():
    # One 10x10 ground-truth square; the prediction covers 62 of its pixels: IoU 0.62 passes the
    # thresholds 0.50, 0.55, 0.60 of the ten (0.50:0.95), so AP = 3/10 and AP50 = 100, AP75 = 0.
    gt_mask = np.zeros((20, 20), dtype=bool)
    gt_mask[5:15, 5:15] = True
    pred = np.zeros_like(gt_mask)
    pred[5:11, 5:15] = True
    pred[11, 5:7] = True
    assert pred.sum() == 62
    gt = {
        "images": [{"id": 1, "height": 20, "width": 20, "file_name": "a.jpg"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": _rle(gt_mask), "area": 100.0,
             "bbox": [5, 5, 10, 10], "iscrowd": 0}
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }  # fmt: skip
    out = coco_segm_metrics(gt, [{"image_id": 1, "category_id": 1, "segmentation": _rle(pred), "score": 0.9}])
    assert out["AP"] == pytest.approx(30.0)
    assert out["AP50"] == pytest.approx(100.0)
    assert out["AP75"] == pytest.approx(0.0)
    assert out["APs"] == pytest.approx(30.0)
    assert out["APm"] is None and out["APl"] is None  # no ground truth there: null, not -100


def test_lvis_ap_of_perfect_masks_under_numpy2(synth):
    lvis = import_lvis()
    assert hasattr(lvis, "LVISEval") and np.dtype(np.float) == np.float64  # the alias the package needs
    data = load_dataset("lvis", data_root=synth)
    out = lvis_segm_metrics(data.annotation_file, _gt_predictions(data), image_ids=data.image_ids)
    assert set(out) == {"AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"}
    assert out["AP"] == pytest.approx(100.0)
    present = {
        c["frequency"] for c in json.loads(data.annotation_file.read_text())["categories"] if c["image_count"]
    }
    for freq in "rcf":
        assert out[f"AP{freq}"] == (pytest.approx(100.0) if freq in present else None)


def test_lvis_false_positive_lowers_ap(synth):
    data = load_dataset("lvis", data_root=synth)
    preds = _gt_predictions(data)
    # A confident prediction of a category the image is verified not to contain is a false positive.
    im = json.loads(data.annotation_file.read_text())["images"][0]
    neg = im["neg_category_ids"][0]
    first = next(p for p in preds if p["image_id"] == im["id"])
    preds.insert(0, {**first, "category_id": neg, "score": 2.0})
    out = lvis_segm_metrics(data.annotation_file, preds, image_ids=data.image_ids)
    assert out["AP"] < 100.0

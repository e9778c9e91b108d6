"""COCO / LVIS annotation loading: layouts, image paths, per-image index, limits and malformed files."""

from __future__ import annotations

import json

import pytest

from evsam_cli.data.synthetic import write_coco
from evsam_cli.errors import DataError
from evsam_cli.evaluation.datasets import annotation_to_mask, load_dataset
from evsam_cli.evaluation.detectors import read_detections


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    write_coco(root, num_images=4, image_size=64, seed=5)
    return root


def test_coco_standard_layout_and_index(root):
    data = load_dataset("coco", data_root=root)
    raw = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    assert data.image_ids == [im["id"] for im in raw["images"]]
    assert all(im.path.parent == root / "val2017" and im.path.is_file() for im in data.images)
    for im in data.images:
        assert data.annotations[im.image_id] == [
            a for a in raw["annotations"] if a["image_id"] == im.image_id
        ]


def test_lvis_images_found_from_coco_url_and_limit(root):
    data = load_dataset("lvis", data_root=root, limit=2)
    assert len(data) == 2 and data.name == "lvis"
    assert all(im.path == root / "val2017" / f"{im.image_id:012d}.jpg" for im in data.images)
    assert set(data.annotations) == set(data.image_ids)
    ann = data.annotations[data.image_ids[0]][0]
    assert "iscrowd" not in ann and annotation_to_mask(ann, data.images[0].height, data.images[0].width).any()
    explicit = load_dataset("lvis", images=root, annotations=root / "annotations" / "lvis_v1_val.json")
    assert explicit.image_ids[:2] == data.image_ids


def test_malformed_segmentation_is_a_data_error():
    with pytest.raises(DataError, match="segmentation"):
        annotation_to_mask({"id": 5, "segmentation": {"size": [4, 4], "counts": 3}}, 4, 4)
    with pytest.raises(DataError, match="is 4x4 but the image is 8x8"):
        annotation_to_mask({"id": 6, "segmentation": {"size": [4, 4], "counts": [16]}}, 8, 8)


def test_missing_paths_and_wrong_files(root, tmp_path):
    with pytest.raises(DataError, match="give data_root"):
        load_dataset("coco", images=root / "val2017")
    with pytest.raises(DataError, match="annotation file not found"):
        load_dataset("coco", images=root / "val2017", annotations=tmp_path / "x.json")
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("voc", data_root=root)
    det_file = root / "annotations" / "detections_val2017.json"
    with pytest.raises(DataError, match="not an LVIS"):
        load_dataset("lvis", images=root, annotations=det_file)  # a results list, not instances
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match="bin.json"):
        load_dataset("coco", images=root / "val2017", annotations=binary)


def test_detections_by_image_and_unknown_ids(root, tmp_path):
    data = load_dataset("coco", data_root=root, limit=1)
    all_ids = [
        im["id"] for im in json.loads((root / "annotations" / "instances_val2017.json").read_text())["images"]
    ]
    dets = json.loads((root / "annotations" / "detections_val2017.json").read_text())
    path = tmp_path / "d.json"
    path.write_text(
        json.dumps([*dets, {"image_id": 12345, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.1}])
    )
    boxes, unknown = read_detections(path, image_ids=data.image_ids, known_ids=all_ids)
    assert list(boxes) == data.image_ids  # other known images (beyond --limit) are simply not wanted
    assert len(boxes[data.image_ids[0]]) == sum(1 for d in dets if d["image_id"] == data.image_ids[0])
    assert unknown == {12345: 1}
    path.write_text(json.dumps({"annotations": []}))
    with pytest.raises(DataError, match="not a COCO results file"):
        read_detections(path, image_ids=data.image_ids)

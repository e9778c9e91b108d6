"""Detectors are a registry: a new one is one class plus one registration, and evaluation (and
the command line's choices) use what is registered."""

from __future__ import annotations

import json

import pytest
import torch

from evsam_cli.data.synthetic import write_coco
from evsam_cli.errors import SettingError
from evsam_cli.evaluation import DetectorOptions, evaluate
from evsam_cli.evaluation import detectors as det
from evsam_cli.models import create_model


def test_builtin_detectors_are_registered():
    assert det.detector_names() == ("vitdet", "yolov8", "groundingdino")
    assert det.get_detector("yolov8") is det.YoloDetector and not det.get_detector("vitdet").live
    with pytest.raises(SettingError, match="unknown detector 'nope'; choose one of vitdet, yolov8") as info:
        det.get_detector("nope")
    assert info.value.params == ("detector",)
    with pytest.raises(ValueError, match="registered twice"):
        det.register_detector("vitdet")(type("Again", (det.RegisteredDetector,), {}))


def test_a_new_detector_is_one_class_and_one_registration(tmp_path, monkeypatch):
    monkeypatch.setattr(det, "_REGISTRY", dict(det._REGISTRY))  # registered for this test only

    @det.register_detector("corner")
    class CornerBoxes(det.RegisteredDetector):
        """One box in the top-left quarter of every image, of the dataset's first category."""

        default_weights = "none needed"

        @classmethod
        def from_options(cls, options, *, categories, device, lvis):
            return cls(int(categories[0]["id"]))

        def __init__(self, category_id: int) -> None:
            self.category_id = category_id

        def __call__(self, image):
            h, w = image.shape[:2]
            return [{"category_id": self.category_id, "bbox": [0.0, 0.0, w / 2, h / 2], "score": 0.9}]

    assert "corner" in det.detector_names()
    paths = write_coco(tmp_path / "coco", num_images=2, image_size=64, seed=1)
    torch.manual_seed(0)
    metrics = evaluate(
        dataset="coco", output=tmp_path / "out", data_root=tmp_path / "coco", model=create_model("l0", input_size=64),
        prompt="detector", detector=DetectorOptions(name="corner"), workers=0, input_size=64,
    )  # fmt: skip
    assert metrics["detector"] == "corner" and metrics["num_prompts"] == 2 and metrics["segm"] is not None
    cached = json.loads((tmp_path / "out" / "detections_corner.json").read_text())
    assert len(cached) == 2 and paths["annotations"].is_file()

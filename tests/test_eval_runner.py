"""The evaluation loop end to end on generated COCO/LVIS data (tiny images, L0 at input size 256)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from evsam_cli.data.synthetic import write_coco
from evsam_cli.evaluation import DetectorOptions, evaluate
from evsam_cli.evaluation.clicker import Clicker
from evsam_cli.evaluation.datasets import annotation_to_mask, bbox_xywh_to_xyxy, load_dataset
from evsam_cli.evaluation.metrics import mask_iou, miou_summary
from evsam_cli.models import create_model, save_weights
from evsam_cli.predictor.sam_predictor import SamPredictor

METRIC_KEYS = {
    "dataset", "prompt", "detector", "model", "checkpoint", "num_images", "num_prompts", "miou", "segm",
    "seconds", "images_per_s", "skipped_images", "dtype",
}  # fmt: skip
SIZE = 256


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    paths = write_coco(root / "coco", num_images=3, image_size=128, seed=1)
    torch.manual_seed(0)
    weights = save_weights(create_model("l0", input_size=SIZE), root / "l0.pt")
    model = create_model("l0", str(weights), input_size=SIZE)
    return root, paths, str(weights), model


def _reference(model, root, prompt: str, clicks: int = 1) -> dict:
    """One predictor.predict call per object, as the official loop does."""
    data = load_dataset("coco", data_root=root / "coco")
    predictor = SamPredictor(model)
    areas, ious = [], []
    for im in data.images:
        rgb = np.array(Image.open(im.path).convert("RGB"))
        predictor.set_image(rgb)
        for ann in data.annotations[im.image_id]:
            gt = annotation_to_mask(ann, *rgb.shape[:2])
            if prompt == "box":
                masks, scores, _ = predictor.predict(box=np.array(bbox_xywh_to_xyxy(ann["bbox"])))
                pred = masks[scores.argmax()]
            else:
                clicker, pred = Clicker(gt), np.zeros_like(gt)
                for _ in range(clicks):
                    clicker.make_next_click(pred)
                    masks, scores, _ = predictor.predict(*clicker.points())
                    pred = masks[scores.argmax()]
            areas.append(ann["area"])
            ious.append(float(mask_iou(pred[None], gt[None])[0]))
    return miou_summary(areas, ious)


@pytest.mark.parametrize(("prompt", "clicks"), [("box", 1), ("point", 2)])
def test_batched_prompts_match_one_call_per_object(setup, prompt, clicks):
    root, paths, weights, model = setup
    out = root / f"out_{prompt}"
    metrics = evaluate(
        dataset="coco", output=out, data_root=root / "coco", model=model, checkpoint=weights, prompt=prompt,
        clicks=clicks, workers=1 if prompt == "box" else 0, batch_size=2, input_size=SIZE,
    )  # fmt: skip
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert set(metrics) == METRIC_KEYS
    n_anns = sum(1 for a in json.loads(paths["annotations"].read_text())["annotations"] if a["area"] >= 1)
    assert metrics["num_images"] == 3 and metrics["num_prompts"] == n_anns
    assert metrics["segm"] is None and metrics["detector"] is None and metrics["checkpoint"] == weights
    ref = _reference(model, root, prompt, clicks)
    for key, value in ref.items():
        if value is None:
            assert metrics["miou"][key] is None
        else:  # batched decoder passes agree with single ones up to float rounding of a few pixels
            assert metrics["miou"][key] == pytest.approx(value, abs=0.05)


@pytest.mark.parametrize("dataset", ["coco", "lvis"])
def test_vitdet_boxes_to_predictions_and_ap(setup, dataset):
    root, paths, weights, model = setup
    out = root / f"out_vitdet_{dataset}"
    metrics = evaluate(
        dataset=dataset, output=out, data_root=root / "coco", model=model, checkpoint=weights, prompt="detector",
        detector=DetectorOptions(name="vitdet", detections=paths["detections"]), workers=0, input_size=SIZE,
    )  # fmt: skip
    dets = json.loads(paths["detections"].read_text())
    preds = json.loads((out / "predictions.json").read_text())
    assert metrics["num_prompts"] == len(dets) == len(preds)
    assert all("bbox" not in p and isinstance(p["segmentation"]["counts"], str) for p in preds)
    assert [(p["image_id"], p["category_id"], p["score"]) for p in preds] == [
        (d["image_id"], d["category_id"], d["score"]) for d in dets
    ]
    keys = {"AP", "AP50", "AP75", "APs", "APm", "APl"} | (
        {"APr", "APc", "APf"} if dataset == "lvis" else set()
    )
    assert set(metrics["segm"]) == keys and metrics["miou"] is None and metrics["detector"] == "vitdet"
    assert all(v is None or 0.0 <= v <= 100.0 for v in metrics["segm"].values())


def test_unreadable_image_is_skipped_and_unknown_detections_dropped(setup, tmp_path, caplog):
    root, paths, weights, model = setup
    data = json.loads(paths["annotations"].read_text())
    broken = tmp_path / "images"
    broken.mkdir()
    for im in data["images"]:
        (broken / im["file_name"]).write_bytes((paths["images"] / im["file_name"]).read_bytes())
    bad = data["images"][1]
    (broken / bad["file_name"]).write_bytes(
        (paths["images"] / bad["file_name"]).read_bytes()[:300]
    )  # truncated
    empty = data["images"][2]  # no boxes for this image: evaluated, nothing to decode
    dets = [d for d in json.loads(paths["detections"].read_text()) if d["image_id"] != empty["id"]]
    dets.append({"image_id": 999999, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5})
    det_file = tmp_path / "dets.json"
    det_file.write_text(json.dumps(dets))
    with caplog.at_level(logging.WARNING):
        metrics = evaluate(
            dataset="coco", output=tmp_path / "out", images=broken, annotations=paths["annotations"],
            model=model, prompt="detector", detector=DetectorOptions(name="vitdet", detections=det_file),
            workers=0, input_size=SIZE,
        )  # fmt: skip
    assert metrics["num_images"] == 2
    assert [s["image_id"] for s in metrics["skipped_images"]] == [bad["id"]]
    assert "cannot decode" in metrics["skipped_images"][0]["reason"]
    assert any("999999" in r.getMessage() and "dropped" in r.getMessage() for r in caplog.records)
    assert any("skipping image" in r.getMessage() for r in caplog.records)
    preds = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert {p["image_id"] for p in preds} == {im["id"] for im in data["images"]} - {bad["id"], empty["id"]}
    assert (
        metrics["num_prompts"] == len(preds) == len(dets) - 1 - sum(d["image_id"] == bad["id"] for d in dets)
    )


def test_lvis_box_prompts_with_limit(setup):
    root, paths, weights, model = setup
    metrics = evaluate(
        dataset="lvis", output=root / "out_lvis_box", data_root=root / "coco", model=model, prompt="box", limit=1,
        workers=0,
    )  # fmt: skip
    lvis = json.loads(paths["lvis"].read_text())
    first = lvis["images"][0]["id"]
    assert metrics["dataset"] == "lvis" and metrics["num_images"] == 1
    assert metrics["num_prompts"] == sum(
        1 for a in lvis["annotations"] if a["image_id"] == first and a["area"] >= 1
    )
    assert 0.0 <= metrics["miou"]["all"] <= 100.0


class _Items:
    """A stand-in for ``EvalImages``: item i is i, read after ``delay`` s; ``fail`` raises."""

    def __init__(self, n: int, fail: int | None = None, delay: float = 0.0) -> None:
        self.n, self.fail, self.delay, self.read = n, fail, delay, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        import time

        time.sleep(self.delay * ((i * 7) % 3))  # out-of-order completion across threads
        if i == self.fail:
            raise OSError(f"cannot read {i}")
        self.read.append(i)
        return i


@pytest.mark.parametrize("threads", [0, 1, 3])
@pytest.mark.parametrize("batch_size", [1, 4, 10])
def test_read_batches_keeps_order_and_batching(threads, batch_size):
    from evsam_cli.evaluation.loader import read_batches

    batches = list(read_batches(_Items(10, delay=0.002), batch_size, threads))  # type: ignore[arg-type]
    assert [i for b in batches for i in b] == list(range(10))
    assert [len(b) for b in batches] == [min(batch_size, 10 - s) for s in range(0, 10, batch_size)]


def test_read_batches_raises_the_readers_error_and_stops_on_close():
    from contextlib import closing

    from evsam_cli.evaluation.loader import read_batches

    with pytest.raises(OSError, match="cannot read 5"):
        list(read_batches(_Items(12, fail=5), 2, 2))  # type: ignore[arg-type]
    items = _Items(100, delay=0.001)
    with closing(read_batches(items, 2, 2)) as batches:  # type: ignore[arg-type]
        assert next(batches) == [0, 1]
    seen = len(items.read)
    assert seen <= 2 + 2 * 2 * 2  # the first batch and at most two batches per thread ahead
    import time

    time.sleep(0.05)
    assert len(items.read) == seen  # no reads after close


def test_reading_defaults_follow_the_machine(setup, monkeypatch):
    """Unset, the encoder takes one image per pass on a CPU and the readers are the cores less one."""
    import evsam_cli.evaluation.runner as runner
    from evsam_cli.evaluation.loader import read_batches

    root, _, weights, model = setup
    seen = []

    def spy(items, batch_size, threads):
        seen.append((batch_size, threads))
        return read_batches(items, batch_size, threads)

    monkeypatch.setattr(runner, "read_batches", spy)
    monkeypatch.setattr(runner, "default_workers", lambda: 3)
    evaluate(
        dataset="coco", output=root / "out_defaults", data_root=root / "coco", model=model, input_size=SIZE
    )
    assert seen == [(1, 3)]
    assert runner.default_batch_size(torch.device("cpu")) == 1
    assert runner.default_batch_size(torch.device("cuda")) == 4

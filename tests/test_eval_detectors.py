"""Detector-prompt evaluation with a live YOLOv8 and a live GroundingDINO (random weights, written
by the tests), the detection cache, class-name mapping, prompt chunking and detector errors."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from evsam_cli.data.synthetic import CATEGORIES, write_coco
from evsam_cli.errors import CheckpointError, DataError, MissingDependencyError
from evsam_cli.evaluation import DetectorOptions, evaluate
from evsam_cli.evaluation.detectors import (
    GroundingDinoDetector,
    YoloDetector,
    class_to_category,
    make_caption,
    split_prompts,
)
from evsam_cli.models import create_model

os.environ.setdefault("YOLO_OFFLINE", "1")  # ultralytics must never reach for the network here


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("det")
    paths = write_coco(root / "coco", num_images=2, image_size=96, seed=2)
    torch.manual_seed(0)
    return root, paths, create_model("l0", input_size=256)


def test_yolo_classes_map_to_dataset_ids_by_name():
    numeric = {i: str(i) for i in range(80)}  # a model built from a yaml: COCO's 80 classes
    mapping = class_to_category(numeric, CATEGORIES)
    assert mapping == {0: 1, 2: 3, 16: 18, 39: 44, 56: 62}  # person, car, dog, bottle, chair
    lvis_like = [{"id": 7, "name": "automobile", "synonyms": ["car", "auto"]}]
    assert class_to_category({0: "car", 1: "zebra"}, lvis_like) == {0: 7}
    with pytest.raises(DataError):
        class_to_category({0: "zebra"}, lvis_like)


def test_prompts_are_split_to_fit_the_text_encoder():
    names = ["person", "traffic light", "dog", "hot dog", "car"]
    count = lambda text: len(text.split()) + 2  # noqa: E731 - words + [CLS]/[SEP]
    groups = split_prompts(names, count, max_tokens=8)
    assert sorted(i for g in groups for i in g) == list(range(5)) and len(groups) > 1
    assert all(count(make_caption([names[i] for i in g])) <= 8 for g in groups)
    with pytest.raises(DataError):
        split_prompts(["a very long category name indeed"], count, max_tokens=4)


@pytest.fixture(scope="module")
def yolo_weights(tmp_path_factory):
    ultralytics = pytest.importorskip("ultralytics")
    path = tmp_path_factory.mktemp("yolo") / "yolov8n_random.pt"
    yolo = ultralytics.YOLO("yolov8n.yaml")  # built from the yaml, random weights
    # Random heads start from a tiny class prior (no box would pass any threshold): make "person"
    # (class 0) and "car" (class 2) likely so the test sees boxes of known classes.
    for branch in yolo.model.model[-1].cv3:
        branch[-1].bias.data[[0, 2]] = 4.0
    yolo.save(str(path))
    return path


def test_yolov8_end_to_end_and_cache_reuse(setup, yolo_weights):
    root, _, model = setup
    out = root / "yolo"
    opts = DetectorOptions(name="yolov8", weights=yolo_weights, image_size=64, max_det=4)
    first = evaluate(
        dataset="coco",
        output=out,
        data_root=root / "coco",
        model=model,
        prompt="detector",
        detector=opts,
        workers=0,
    )
    cache = out / "detections_yolov8.json"
    dets = json.loads(cache.read_text())
    assert first["num_prompts"] == len(dets) == len(json.loads((out / "predictions.json").read_text()))
    assert 0 < len(dets) <= 2 * 4 and {d["category_id"] for d in dets} <= {1, 3}  # COCO ids of person, car
    # Second run: the cached boxes are reused, so the (now missing) weights are never loaded.
    again = evaluate(
        dataset="coco", output=out, data_root=root / "coco", model=model, prompt="detector", workers=0,
        detector=DetectorOptions(name="yolov8", weights=root / "gone.pt"),
    )  # fmt: skip
    assert again["segm"] == first["segm"] and again["num_prompts"] == first["num_prompts"]


def test_yolov8_bad_weights_and_missing_extra(tmp_path, monkeypatch, yolo_weights):
    bad = tmp_path / "broken.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="broken.pt"):
        YoloDetector(weights=bad, categories=CATEGORIES)
    with pytest.raises(CheckpointError, match="not found"):
        YoloDetector(weights=tmp_path / "sub" / "missing.pt", categories=CATEGORIES)
    monkeypatch.setitem(sys.modules, "ultralytics", None)
    with pytest.raises(MissingDependencyError, match=r"evsam\[yolo\]"):
        YoloDetector(weights=yolo_weights, categories=CATEGORIES)


def _tiny_groundingdino(root: Path) -> tuple[Path, Path, Path]:
    """A GroundingDINO config (1 encoder/decoder layer, short text length) + random weights + tiny BERT."""
    pytest.importorskip("groundingdino")
    transformers = pytest.importorskip("transformers")
    bert = root / "bert"
    bert.mkdir()
    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        ".",
        "?",
        "person",
        "car",
        "dog",
        "bottle",
        "chair",
    ]
    (bert / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(bert / "vocab.txt")).save_pretrained(bert)
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    transformers.BertModel(config).save_pretrained(bert)
    import groundingdino
    from groundingdino.models import build_model
    from groundingdino.util.slconfig import SLConfig

    text = (Path(groundingdino.__file__).parent / "config" / "GroundingDINO_SwinT_OGC.py").read_text()
    for old, new in [
        ("enc_layers = 6", "enc_layers = 1"), ("dec_layers = 6", "dec_layers = 1"),
        ("num_queries = 900", "num_queries = 4"), ("dim_feedforward = 2048", "dim_feedforward = 64"),
        ("max_text_len = 256", "max_text_len = 8"),  # forces several prompts for 5 categories
    ]:  # fmt: skip
        assert old in text
        text = text.replace(old, new)
    cfg = root / "gdino_tiny.py"
    cfg.write_text(text)
    args = SLConfig.fromfile(str(cfg))
    args.device, args.text_encoder_type = "cpu", str(bert)
    weights = root / "gdino_random.pth"
    torch.save({"model": build_model(args).state_dict()}, weights)
    return cfg, weights, bert


def test_groundingdino_end_to_end_chunked_prompts_and_cache(setup, tmp_path):
    root, _, model = setup
    cfg, weights, bert = _tiny_groundingdino(tmp_path)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(bert))
    names = [c["name"] for c in CATEGORIES]
    groups = split_prompts(names, lambda text: len(tokenizer(text)["input_ids"]), 8)
    assert len(groups) > 1  # "person . car . dog . bottle . chair ." does not fit 8 tokens: chunked
    opts = DetectorOptions(
        name="groundingdino", weights=weights, config=cfg, text_encoder=bert, image_size=64
    )
    out = tmp_path / "out"
    cache = tmp_path / "gdino_cache.json"
    first = evaluate(
        dataset="lvis", output=out, data_root=root / "coco", model=model, prompt="detector", workers=0,
        detector=DetectorOptions(**{**opts.__dict__, "detections": cache}),
    )  # fmt: skip
    dets = json.loads(cache.read_text())
    assert (
        first["num_prompts"] == len(dets) == 2 * 4 * 5
    )  # every (query, category) pair: fewer than the 300 LVIS keeps
    assert {d["category_id"] for d in dets} <= {c["id"] for c in CATEGORIES}
    assert {"APr", "APc", "APf"} <= set(first["segm"])
    again = evaluate(
        dataset="lvis", output=out, data_root=root / "coco", model=model, prompt="detector", workers=0,
        detector=DetectorOptions(name="groundingdino", detections=cache),
    )  # fmt: skip
    assert again["segm"] == first["segm"]


def test_groundingdino_errors(tmp_path, monkeypatch):
    pytest.importorskip("groundingdino")
    cfg = tmp_path / "cfg.py"
    cfg.write_text("x = 1\n")
    bad = tmp_path / "w.pth"
    bad.write_text("garbage")
    with pytest.raises(CheckpointError, match="text encoder folder not found"):
        GroundingDinoDetector(config=cfg, weights=bad, text_encoder=tmp_path / "nope", categories=CATEGORIES)
    monkeypatch.setitem(sys.modules, "groundingdino.models", None)
    with pytest.raises(MissingDependencyError, match=r"evsam\[gdino\]"):
        GroundingDinoDetector(config=cfg, weights=bad, text_encoder=tmp_path, categories=CATEGORIES)

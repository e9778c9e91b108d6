"""`evsam eval` on the command line: a real run, the bad inputs, and a 2-process torchrun run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from _util import torchrun_cmd
from typer.testing import CliRunner

from evsam_cli.cli.app import app
from evsam_cli.data.synthetic import write_coco
from evsam_cli.models import create_model, save_weights

runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    paths = write_coco(root / "coco", num_images=3, image_size=96, seed=4)
    torch.manual_seed(0)
    weights = save_weights(create_model("l0", input_size=256), root / "l0.pt")
    return root, paths, weights


def _run(*args: str):
    return runner.invoke(app, list(args))


def _error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_detector_flag_alone_implies_detector_prompts(data, tmp_path):
    root, paths, weights = data
    out = tmp_path / "out"
    result = _run(
        "eval", "--detector", "vitdet", "coco", "--data-root", str(root / "coco"), "--detections",
        str(paths["detections"]), "--checkpoint", str(weights), "--input-size", "256", "--workers", "0",
        "--limit", "2", "-o", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["prompt"] == "detector" and metrics["detector"] == "vitdet" and metrics["num_images"] == 2
    assert metrics["checkpoint"] == str(weights) and (out / "predictions.json").is_file()
    assert "mask AP50" in result.output and "images" in result.output


def test_bad_inputs_give_one_error_line(data, tmp_path, monkeypatch):
    root, paths, _ = data
    coco = str(root / "coco")
    # `evsam eval --detector yolov8 coco` parses; without a ./coco folder it says what is missing.
    monkeypatch.chdir(tmp_path)
    assert (
        "--data-root is not a folder: coco (give --data-root, or --images and --annotations)"
        in _error_line(_run("eval", "--detector", "yolov8", "coco"))
    )
    malformed = tmp_path / "bad.json"
    malformed.write_text("{not json")
    line = _error_line(
        _run("eval", "coco", "--images", str(paths["images"]), "--annotations", str(malformed))
    )
    assert "malformed JSON" in line and "bad.json" in line
    not_coco = tmp_path / "list.json"
    not_coco.write_text("[1, 2]")
    line = _error_line(_run("eval", "coco", "--images", str(paths["images"]), "--annotations", str(not_coco)))
    assert "not a COCO instance annotation file" in line
    # An LVIS file given as COCO: its images have no file_name.
    line = _error_line(
        _run("eval", "coco", "--images", str(paths["images"]), "--annotations", str(paths["lvis"]))
    )
    assert "file_name" in line
    line = _error_line(
        _run("eval", "coco", "--images", str(tmp_path / "nope"), "--annotations", str(paths["annotations"]))
    )
    assert "image folder not found" in line
    bad_dets = tmp_path / "dets.json"
    bad_dets.write_text(json.dumps([{"image_id": 1, "bbox": [1, 2]}]))
    line = _error_line(
        _run("eval", "coco", "--data-root", coco, "--detector", "vitdet", "--detections", str(bad_dets))
    )
    assert "not a COCO detection result" in line
    assert "--detections" in _error_line(_run("eval", "coco", "--data-root", coco, "--detector", "vitdet"))
    line = _error_line(_run("eval", "coco", "--data-root", coco, "--prompt", "box", "--detector", "vitdet"))
    assert "--detector goes with --prompt detector" in line
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"\x00garbage")
    line = _error_line(
        _run(
            "eval",
            "coco",
            "--data-root",
            coco,
            "--detector",
            "yolov8",
            "--detector-weights",
            str(broken),
            "-o",
            "o",
        )
    )
    assert "broken.pt" in line
    monkeypatch.setitem(sys.modules, "groundingdino.models", None)
    line = _error_line(
        _run("eval", "lvis", "--data-root", coco, "--detector", "groundingdino", "--detector-weights", str(broken),
             "--detector-config", str(broken), "--text-encoder", str(tmp_path), "-o", "o")
    )  # fmt: skip
    assert "groundingdino-py" in line and "evsam[gdino]" in line


def test_yolo_first_run_prints_nothing_but_the_error(data, tmp_path):
    """On a machine where ultralytics has never run, importing it writes a settings file and
    announces it on stdout; evsam's output must still be one Error line."""
    root, _, _ = data
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"\x00garbage")
    env = {**os.environ, "YOLO_CONFIG_DIR": str(tmp_path / "fresh-config")}
    env.pop("YOLO_VERBOSE", None)
    cmd = [sys.executable, "-m", "evsam_cli", "eval", "coco", "--data-root", str(root / "coco"),
           "--detector", "yolov8", "--detector-weights", str(broken), "-o", str(tmp_path / "o")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("Error: "), lines
    assert any((tmp_path / "fresh-config").rglob("settings.json"))  # the first run did happen


@pytest.mark.slow
def test_torchrun_two_processes_match_one(data, tmp_path):
    """Detector prompts: duplicated images (DistributedSampler padding) would show in AP and predictions."""
    root, paths, weights = data
    common = [
        "eval", "coco", "--data-root", str(root / "coco"), "--checkpoint", str(weights), "--input-size", "256",
        "--workers", "0", "--batch-size", "2", "--detector", "vitdet", "--detections", str(paths["detections"]),
    ]  # fmt: skip
    single = _run(*common, "-o", str(tmp_path / "one"))
    assert single.exit_code == 0, single.output
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EVSAM_DEBUG": "1"}
    cmd = torchrun_cmd(*common, "-o", str(tmp_path / "two"))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    for key in ("num_images", "num_prompts", "miou", "segm", "skipped_images"):
        assert one[key] == two[key], key
    assert one["num_images"] == 3  # 3 images over 2 ranks: 2 + 1, none scored twice
    preds = (tmp_path / "one" / "predictions.json").read_text()
    assert preds == (tmp_path / "two" / "predictions.json").read_text()

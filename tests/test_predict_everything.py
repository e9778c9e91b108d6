"""`evsam predict --everything` end to end on a generated image with a small grid."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from evsam_cli.cli.app import app
from evsam_cli.data.synthetic import synth_image

runner = CliRunner()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A generated PNG and an L0 checkpoint whose masks pass the thresholds used below."""
    from evsam_cli.models import create_model, save_weights

    folder = tmp_path_factory.mktemp("everything")
    image, _, _ = synth_image(np.random.default_rng(5), 90, 120, 5)
    Image.fromarray(image).save(folder / "scene.png")
    torch.manual_seed(0)
    model = create_model("efficientvit-sam-l0")
    with torch.no_grad():
        model.mask_decoder.iou_prediction_head.layers[-1].bias += 0.9
        for mlp in model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight *= 100
    save_weights(model, folder / "l0.pt")
    return folder, image


def _run(*args: str):
    return runner.invoke(app, ["predict", *args])


def test_everything_end_to_end(inputs, tmp_path):
    folder, image = inputs
    out = tmp_path / "out"
    result = _run(
        str(folder / "scene.png"),
        "--everything",
        "--checkpoint",
        str(folder / "l0.pt"),
        "--points-per-side",
        "3",
        "--pred-iou-thresh",
        "0.8",
        "--stability-score-thresh",
        "0.8",
        "--box-nms-thresh",
        "1.0",
        "-o",
        str(out),
    )
    assert result.exit_code == 0, result.output
    assert "segment everything" in result.output and "masks.json and overlay.png" in result.output
    data = json.loads((out / "masks.json").read_text())
    assert data["image"] == {"file_name": str(folder / "scene.png"), "height": 90, "width": 120}
    assert data["model"] == "efficientvit-sam-l0" and data["settings"]["points_per_side"] == 3
    anns = data["annotations"]
    assert data["num_masks"] == len(anns) >= 1
    assert data["mean_predicted_iou"] == pytest.approx(np.mean([a["predicted_iou"] for a in anns]))
    assert data["seconds"]["total"] > 0
    for i, a in enumerate(anns):
        assert a["id"] == i and a["predicted_iou"] > 0.8 and a["stability_score"] >= 0.8
        seg = a["segmentation"]
        mask = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)
        assert mask.shape == (90, 120) and mask.sum() == a["area"]
        ys, xs = np.nonzero(mask)
        assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]
        assert a["crop_box"] == [0, 0, 120, 90]
    overlay = np.asarray(Image.open(out / "overlay.png"))
    assert overlay.shape == (90, 120, 3) and not np.array_equal(overlay, image)
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_everything_small_batches_and_cleanup(inputs, tmp_path):
    folder, _ = inputs
    out = tmp_path / "out"
    result = _run(
        str(folder / "scene.png"),
        "--everything",
        "--checkpoint",
        str(folder / "l0.pt"),
        "--points-per-side",
        "2",
        "--points-per-batch",
        "1",
        "--min-mask-region-area",
        "20",
        "--pred-iou-thresh",
        "0.8",
        "--stability-score-thresh",
        "0.8",
        "-o",
        str(out),
    )
    assert result.exit_code == 0, result.output
    data = json.loads((out / "masks.json").read_text())
    assert data["settings"]["points_per_batch"] == 1 and data["settings"]["min_mask_region_area"] == 20
    assert data["num_masks"] == len(data["annotations"]) >= 1


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--everything", "--box", "1,2,30,40"], "drop --box/--point"),
        (["--points-per-side", "4"], "--points-per-side applies to --everything only"),
        (["--everything", "--pred-iou-thresh", "1.5"], "--pred-iou-thresh must be a number in [0, 1]"),
        (["--everything", "--stability-score-thresh", "-1"], "--stability-score-thresh must"),
        (["--everything", "--points-per-side", "0"], "--points-per-side must be an integer >= 1"),
        (["--everything", "--box-nms-thresh", "2"], "--box-nms-thresh must"),
    ],
)
def test_bad_options_one_error_line(inputs, tmp_path, extra, words):
    folder, _ = inputs
    out = tmp_path / "out"
    result = _run(str(folder / "scene.png"), *extra, "-o", str(out))
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and words in lines[0].replace("\n", " "), (
        result.output
    )
    assert "Traceback" not in result.output
    assert not out.exists()  # checked before anything is loaded or written


def test_image_that_does_not_decode(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    result = _run(str(bad), "--everything", "--points-per-side", "2", "-o", str(tmp_path / "out"))
    assert result.exit_code == 1
    assert result.output.strip().startswith("Error:") and "broken.png" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out" / "masks.json").exists()


def test_prompt_path_unchanged(inputs, tmp_path):
    folder, _ = inputs
    out = tmp_path / "out"
    result = _run(str(folder / "scene.png"), "--box", "10,10,60,50", "-o", str(out))
    assert result.exit_code == 0, result.output
    scores = json.loads((out / "scores.json").read_text())
    assert len(scores["prompts"]) == 1 and (out / "mask_0.png").exists() and not (out / "masks.json").exists()
    no_prompt = _run(str(folder / "scene.png"), "-o", str(out))
    assert no_prompt.exit_code == 1 and "--box or --point" in no_prompt.output

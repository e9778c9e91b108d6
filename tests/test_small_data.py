"""Issue 20, item 1: users start small. With the default validation split a 4-image SA-1B shard
(distill) and a 12-image COCO-format set (finetune) train on all but one image and say so; an
explicit split that leaves nothing to train on is one error naming the counts."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from evsam_cli.cli.app import app
from evsam_cli.data.synthetic import write_coco, write_sa1b
from evsam_cli.models import create_model, export_state_dict

runner = CliRunner()
QUICK = ["--image-size", "64", "--steps", "1", "--batch-size", "1", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return write_coco(tmp_path_factory.mktemp("coco"), num_images=12, image_size=64, seed=1)


@pytest.mark.slow
def test_distill_one_small_shard_with_default_split(tmp_path):
    write_sa1b(tmp_path / "sa1b", num_images=4, image_size=64, shards=1, seed=0)
    torch.manual_seed(0)
    torch.save(export_state_dict(create_model("sam-vit-b")), tmp_path / "sam_vit_b.pth")
    output = tmp_path / "run"
    args = ["distill", "--teacher", "vit_b", "--teacher-checkpoint", str(tmp_path / "sam_vit_b.pth")]
    result = runner.invoke(
        app, [*args, "--student", "l0", "--data", str(tmp_path / "sa1b"), "-o", str(output), *QUICK]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((output / "summary.json").read_text())
    assert summary["val_images"] == 1 and summary["steps"] == 1 and summary["val_mse"] is not None
    config = json.loads((output / "config.json").read_text())
    assert config["data"]["val_images"] == 1 and config["optim"]["warmup_steps"] == 0
    assert isinstance(config["data"]["workers"], int)


def test_finetune_small_coco_set_with_default_split(tmp_path, coco):
    output = tmp_path / "run"
    data = ["--data", str(coco["images"]), "--annotations", str(coco["annotations"])]
    result = runner.invoke(
        app, ["finetune", "--model", "l0", *data, "-o", str(output), "--masks-per-image", "2", *QUICK]
    )
    assert result.exit_code == 0, result.output
    assert "validation: 1 of 12 annotated image(s) held out" in result.stderr
    summary = json.loads((output / "summary.json").read_text())
    assert summary["val_images"] == 1 and summary["val_iou"] is not None


def test_a_split_that_leaves_nothing_to_train_on_is_one_error(tmp_path, coco):
    data = ["--data", str(coco["images"]), "--annotations", str(coco["annotations"])]
    result = runner.invoke(
        app, ["finetune", *data, "-o", str(tmp_path / "run"), "--val-images", "12", *QUICK]
    )
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert (
        lines[0].startswith("Error: --val-images=12 holds out all 12 image(s)") and "at most 11" in lines[0]
    )
    assert not (tmp_path / "run").exists()

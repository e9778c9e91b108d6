"""The command line: help, models, predict, data synth and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from evsam_cli.cli.app import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def assert_one_line_error(result, *fragments: str):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_help_lists_every_command():
    result = run("--help")
    assert result.exit_code == 0
    for name in ("distill", "finetune", "export", "bench", "eval", "predict", "models", "data"):
        assert name in result.output
    for name in ("distill", "finetune", "export", "bench", "eval", "predict", "models", "data", "data synth"):
        sub = run(*name.split(), "--help")
        assert sub.exit_code == 0, (name, sub.output)
        assert "Usage" in sub.output


def _commands():
    """(words, click command) of every subcommand, ``data synth`` included."""
    import typer

    root = typer.main.get_command(app)
    for name, cmd in root.commands.items():
        if hasattr(cmd, "commands"):
            yield from (([name, sub_name], sub) for sub_name, sub in cmd.commands.items())
        else:
            yield [name], cmd


@pytest.mark.parametrize("words, cmd", list(_commands()), ids=[" ".join(w) for w, _ in _commands()])
def test_help_shows_every_option_name_whole_at_80_columns(words, cmd):
    import re

    result = runner.invoke(app, [*words, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "\u2026" not in result.output  # rich's ellipsis: something was cut
    assert max(len(line) for line in result.output.splitlines()) <= 80
    names = [n for p in cmd.params if not getattr(p, "hidden", False) for n in (*p.opts, *p.secondary_opts)]
    assert names
    for name in names:
        if name.startswith("--"):
            assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", result.output), (words, name)


def test_help_is_fast_and_does_not_import_torch():
    code = "import sys; from evsam_cli.cli.app import app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_models_table_and_json(tmp_path):
    result = run("models", "--json", str(tmp_path / "zoo.json"))
    assert result.exit_code == 0, result.output
    for name in ("efficientvit-sam-l0", "efficientvit-sam-xl1", "sam-vit-h"):
        assert name in result.output
    rows = json.loads((tmp_path / "zoo.json").read_text())["models"]
    assert len(rows) == 8
    l0 = next(r for r in rows if r["model"] == "efficientvit-sam-l0")
    assert round(l0["params"] / 1e6, 1) == 34.8 and round(l0["encoder_macs"] / 1e9) == 35
    assert l0["input_size"] == 512


@pytest.fixture
def image_file(tmp_path, scene):
    path = tmp_path / "scene.png"
    Image.fromarray(scene[0]).save(path)
    return path


@pytest.fixture
def l0_checkpoint(tmp_path_factory):
    from evsam_cli.models import create_model, save_weights

    torch.manual_seed(3)
    return save_weights(create_model("l0"), tmp_path_factory.mktemp("ckpt") / "l0.pt")


def test_predict_boxes_end_to_end(tmp_path, image_file, l0_checkpoint):
    out = tmp_path / "out"
    result = run(
        "predict", str(image_file), "--box", "80,45,160,135", "--box", "10,10,60,50",
        "--checkpoint", str(l0_checkpoint), "-o", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    scores = json.loads((out / "scores.json").read_text())
    assert scores["model"] == "efficientvit-sam-l0" and len(scores["prompts"]) == 2
    assert scores["checkpoint"] == str(l0_checkpoint)
    for i, prompt in enumerate(scores["prompts"]):
        mask = np.asarray(Image.open(out / prompt["mask"]))
        assert mask.shape == (180, 240)
        assert int((mask > 0).sum()) == prompt["area"]
        assert prompt["box"] == [[80.0, 45.0, 160.0, 135.0], [10.0, 10.0, 60.0, 50.0]][i]
    overlay = Image.open(out / "overlay.png")
    assert overlay.size == (240, 180) and overlay.mode == "RGB"
    assert not list(out.glob("*.tmp"))


def test_predict_points_single_prompt(tmp_path, image_file):
    out = tmp_path / "out"
    result = run("predict", str(image_file), "--point", "120,90", "--point", "5,5,0", "-o", str(out))
    assert result.exit_code == 0, result.output
    scores = json.loads((out / "scores.json").read_text())
    assert len(scores["prompts"]) == 1 and scores["prompts"][0]["labels"] == [1, 0]
    assert scores["multimask_output"] is False


def test_data_synth_both_formats(tmp_path):
    result = run(
        "data", "synth", "--format", "coco", "--images", "2", "--size", "96", "-o", str(tmp_path / "coco")
    )
    assert result.exit_code == 0, result.output
    coco = json.loads((tmp_path / "coco" / "annotations" / "instances_val2017.json").read_text())
    assert len(coco["images"]) == 2 and coco["annotations"]
    assert all((tmp_path / "coco" / "val2017" / im["file_name"]).is_file() for im in coco["images"])
    assert (tmp_path / "coco" / "annotations" / "lvis_v1_val.json").is_file()
    result = run(
        "data",
        "synth",
        "--format",
        "sa1b",
        "--images",
        "3",
        "--shards",
        "2",
        "--size",
        "96",
        "-o",
        str(tmp_path / "sa"),
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "sa").iterdir()) == ["sa_000000.tar", "sa_000001.tar"]


def test_predict_bad_inputs(tmp_path, image_file, l0_checkpoint):
    out = str(tmp_path / "o")
    assert_one_line_error(
        run("predict", str(tmp_path / "nope.jpg"), "--box", "1,2,3,4", "-o", out), "image not found"
    )
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"not an image")
    assert_one_line_error(
        run("predict", str(corrupt), "--box", "1,2,3,4", "-o", out), "cannot decode", "corrupt.jpg"
    )
    assert_one_line_error(run("predict", str(image_file), "--box", "1,2,3", "-o", out), "--box")
    assert_one_line_error(run("predict", str(image_file), "-o", out), "--box")
    assert_one_line_error(
        run(
            "predict",
            str(image_file),
            "--box",
            "1,2,3,4",
            "-m",
            "l1",
            "--checkpoint",
            str(l0_checkpoint),
            "-o",
            out,
        ),
        "does not fit model efficientvit-sam-l1",
        "looks like efficientvit-sam-l0",
    )
    assert_one_line_error(
        run("predict", str(image_file), "--box", "1,2,3,4", "-m", "l7", "-o", out), "unknown model"
    )
    if not torch.cuda.is_available():
        assert_one_line_error(
            run("predict", str(image_file), "--box", "1,2,3,4", "--device", "cuda", "-o", out), "no CUDA GPU"
        )


def test_usage_errors_are_one_line_exit_1(tmp_path):
    assert_one_line_error(run("data", "synth", "--format", "bogus", "-o", str(tmp_path)), "--format")
    assert_one_line_error(run("no-such-command"), "no-such-command")


def test_debug_shows_traceback(tmp_path):
    result = runner.invoke(
        app, ["--debug", "predict", str(tmp_path / "nope.jpg"), "--box", "1,2,3,4", "-o", str(tmp_path)]
    )
    assert result.exit_code != 0
    assert result.exception is not None and type(result.exception).__name__ == "DataError"


def test_atomic_writes_keep_usual_permissions_and_leave_no_temp(tmp_path):
    import os

    from evsam_cli.utils.io import atomic_path, write_json_atomic

    target = write_json_atomic(tmp_path / "a.json", {"x": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert (target.stat().st_mode & 0o777) == 0o666 & ~mask
    target.write_text("keep me")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half written")
        raise RuntimeError("crash while writing")
    assert target.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]

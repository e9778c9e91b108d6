"""A checkpoint file never runs code: every flag that reads one refuses a poisoned pickle with one line.

The poison is a real torch.save file whose unpickling would create a sentinel file (a full
``torch.load`` does create it: checked below), so "the sentinel never appears" is what proves
nothing was unpickled outside the safe loader.
"""

from __future__ import annotations

import argparse
import pathlib
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from evsam_cli.cli.app import app
from evsam_cli.data.synthetic import write_sa1b
from evsam_cli.errors import CheckpointError
from evsam_cli.models.checkpoints import FOREIGN, REFUSED, TRUNCATED, load_file
from evsam_cli.train import loop

runner = CliRunner()


class _Touch:
    """Unpickles into ``Path.touch(sentinel)``: a stand-in for any code a pickle can run."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (pathlib.Path.touch, (self.sentinel,))


def _poison(path: Path, sentinel: Path, *, legacy: bool = False) -> Path:
    """A checkpoint-looking file: real weights plus one object whose unpickling touches ``sentinel``."""
    obj = {"model": {"w": torch.zeros(2)}, "payload": _Touch(sentinel)}
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def _bad_files(root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, the reason its error line gives)."""
    root.mkdir(parents=True, exist_ok=True)
    good = root / "good.pt"
    torch.save({"w": torch.zeros(4096)}, good)
    data = good.read_bytes()
    (root / "truncated.pt").write_bytes(data[: len(data) // 2])
    (root / "text.pt").write_text("these are not the weights you are looking for\n")
    with zipfile.ZipFile(root / "other.zip", "w") as archive:
        archive.writestr("readme.txt", "a zip of something else")
    with open(root / "raw.pkl", "wb") as f:  # a bare pickle, not torch.save's format
        pickle.dump(_Touch(root / "sentinel"), f)
    return {
        "poisoned": (_poison(root / "poisoned.pt", root / "sentinel"), REFUSED),
        "poisoned_legacy": (_poison(root / "legacy.pt", root / "sentinel", legacy=True), REFUSED),
        "truncated": (root / "truncated.pt", TRUNCATED),
        "text": (root / "text.pt", FOREIGN),
        "zip": (root / "other.zip", FOREIGN),
        "raw_pickle": (root / "raw.pkl", FOREIGN),
    }


def test_the_poison_is_live(tmp_path):
    """Without the safe loader the file does run its code (so the tests below test something)."""
    sentinel = tmp_path / "sentinel"
    torch.load(_poison(tmp_path / "p.pt", sentinel), weights_only=False)
    assert sentinel.exists()


def test_load_file_reasons(tmp_path):
    for name, (path, reason) in _bad_files(tmp_path).items():
        with pytest.raises(CheckpointError) as info:
            load_file(path, what="checkpoint")
        message = str(info.value)
        assert reason in message and str(path) in message and "\n" not in message, (name, message)
    assert not (tmp_path / "sentinel").exists()
    with pytest.raises(CheckpointError, match="not found"):
        load_file(tmp_path / "missing.pt")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=TRUNCATED):
        load_file(empty)


def test_allow_admits_exactly_the_named_class(tmp_path):
    path = tmp_path / "with_args.pth"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1e-4, names=["a"])}, path)
    with pytest.raises(CheckpointError, match="argparse.Namespace"):
        load_file(path)
    obj = load_file(path, allow=[argparse.Namespace])
    assert obj["args"].lr == 1e-4 and torch.equal(obj["model"]["w"], torch.ones(2))
    with pytest.raises(CheckpointError, match=REFUSED):  # the allowance was for that one call
        load_file(path)
    sentinel = tmp_path / "sentinel"
    with pytest.raises(CheckpointError, match=REFUSED):
        load_file(_poison(tmp_path / "p.pt", sentinel), allow=[argparse.Namespace])
    assert not sentinel.exists()


def test_groundingdino_weights_are_read_safely(tmp_path):
    from evsam_cli.evaluation.detectors import GroundingDinoDetector

    sentinel = tmp_path / "sentinel"
    with pytest.raises(CheckpointError, match=REFUSED):
        GroundingDinoDetector._load(torch.nn.Linear(2, 2), _poison(tmp_path / "g.pth", sentinel))
    assert not sentinel.exists()
    # The release layout: "model" beside the training arguments as an argparse.Namespace.
    model = torch.nn.Linear(2, 2)
    path = tmp_path / "release.pth"
    torch.save(
        {"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "args": argparse.Namespace()},
        path,
    )
    GroundingDinoDetector._load(torch.nn.Linear(2, 2), path)


def test_rng_state_is_plain_data_and_restores_exactly(tmp_path):
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's and numpy's state
    np.random.standard_normal()
    path = tmp_path / "rng.pt"
    torch.save(loop._rng_state(), path)
    expected = (
        random.random(),
        random.gauss(0, 1),
        np.random.random(3),
        np.random.standard_normal(),
        torch.rand(3),
    )
    loop._set_rng_state(load_file(path))  # the safe loader reads it back
    got = (
        random.random(),
        random.gauss(0, 1),
        np.random.random(3),
        np.random.standard_normal(),
        torch.rand(3),
    )
    assert got[:2] == expected[:2] and np.array_equal(got[2], expected[2]) and got[3] == expected[3]
    assert torch.equal(got[4], expected[4])


# ---------------------------------------------------------------------------- every flag, end to end
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    write_sa1b(root / "sa1b", num_images=2, image_size=64, seed=0)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "photo.png")
    return root


def _flag_cases(env: Path, bad: Path, out: Path) -> dict[str, list[str]]:
    train = ["--data", str(env / "sa1b"), "--output", str(out), "--image-size", "64", "--batch-size", "1"]
    train += ["--workers", "0", "--val-images", "1", "--steps", "1", "--device", "cpu", "--no-progress"]
    return {
        "predict --checkpoint": [
            "predict", str(env / "photo.png"), "--box", "1,1,20,20", "-m", "l0", "--checkpoint", str(bad),
            "-o", str(out), "--device", "cpu",
        ],
        "eval --checkpoint": [
            "eval", "coco", "--data-root", str(env / "coco"), "-m", "l0", "--checkpoint", str(bad),
            "--input-size", "64", "--workers", "0", "--device", "cpu", "-o", str(out),
        ],
        "export --checkpoint": ["export", "--model", "l0", "--checkpoint", str(bad), "--input-size", "64", "-o", str(out)],
        "bench --checkpoint": [
            "bench", "--model", "l0", "--checkpoint", str(bad), "--input-size", "64", "--device", "cpu",
            "--dtype", "fp32", "--warmup", "1", "--iters", "1",
        ],
        "finetune --init": ["finetune", "--model", "l0", "--init", str(bad), *train],
        "finetune --sam-head-checkpoint": ["finetune", "--model", "l0", "--sam-head-checkpoint", str(bad), *train],
        "distill --teacher-checkpoint": [
            "distill", "--teacher", "vit_b", "--teacher-checkpoint", str(bad), "--student", "l0",
            "--teacher-cache", str(env / "cache"), *train,
        ],
    }  # fmt: skip


def _assert_one_error_line(result, needle: str, path: Path, case: str) -> None:
    assert result.exit_code == 1, (case, result.output)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error:"), (case, result.output)
    assert needle in lines[-1] and path.name in lines[-1], (case, lines[-1])
    assert "Traceback" not in result.output and "weights_only" not in result.output, (case, result.output)


def test_every_checkpoint_flag_refuses_a_poisoned_file(env, tmp_path):
    from evsam_cli.data.synthetic import write_coco

    write_coco(env / "coco", num_images=1, image_size=64, seed=0)
    sentinel = tmp_path / "sentinel"
    bad = _poison(tmp_path / "poisoned.pt", sentinel)
    for i, case in enumerate(_flag_cases(env, bad, tmp_path)):
        args = _flag_cases(env, bad, tmp_path / f"out{i}")[case]  # a fresh output folder each
        _assert_one_error_line(runner.invoke(app, args), REFUSED, bad, case)
        assert not sentinel.exists(), case


@pytest.mark.parametrize("command", ["finetune", "distill"])
def test_resume_refuses_a_planted_last_pt(tmp_path, command):
    sentinel = tmp_path / "sentinel"
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    last = _poison(out / "checkpoints" / "last.pt", sentinel)
    result = runner.invoke(app, [command, "--output", str(out), "--resume"])
    _assert_one_error_line(result, REFUSED, last, command)
    assert "training checkpoint" in result.output
    assert not sentinel.exists()


def test_truncated_and_foreign_files_say_so(env, tmp_path):
    out = tmp_path / "out"
    for name, (path, reason) in _bad_files(tmp_path / "files").items():
        args = _flag_cases(env, path, out)["predict --checkpoint"]
        _assert_one_error_line(runner.invoke(app, args), reason, path, name)
    # A half-written last.pt (a kill cannot leave one, a copy can) is named as such.
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    truncated = run / "checkpoints" / "last.pt"
    truncated.write_bytes((tmp_path / "files" / "truncated.pt").read_bytes())
    result = runner.invoke(app, ["finetune", "--output", str(run), "--resume"])
    _assert_one_error_line(result, TRUNCATED, truncated, "resume truncated")
    assert not (tmp_path / "files" / "sentinel").exists()


def test_resume_wants_an_evsam_training_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"w": torch.zeros(2)}, path)  # readable, but a weights file
    with pytest.raises(CheckpointError, match="not an evsam training checkpoint"):
        loop.load_checkpoint_file(path)

"""`evsam distill` end to end on a generated SA-1B folder with a random ViT-B teacher in Meta's format.

SAM ViT-B at 1024x1024 takes many seconds per image on a small CPU, so the file runs the teacher
exactly twice (the cold run below fills the cache) and every later run reads the warm cache,
which is itself what the cache test checks. The student trains at a 64x64 input.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _util import kill_at_first_checkpoint, metrics_records, run_evsam
from typer.testing import CliRunner

from evsam_cli.cli.app import app
from evsam_cli.data.synthetic import write_sa1b
from evsam_cli.models import create_model, export_state_dict, read_state_dict
from evsam_cli.train.config import DataConfig, DistillConfig, LoopConfig, OptimConfig
from evsam_cli.train.distill import distill


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    write_sa1b(root / "sa1b", num_images=2, image_size=64, seed=0)
    torch.manual_seed(0)
    teacher = create_model("sam-vit-b")
    torch.save(export_state_dict(teacher), root / "sam_vit_b.pth")  # plain Meta layout, like the release
    return root


def _cfg(env: Path, output: Path, **loop) -> DistillConfig:
    defaults = dict(steps=2, log_every=1, save_every=1, val_every=0, device="cpu")
    return DistillConfig(
        teacher="vit_b",
        teacher_checkpoint=str(env / "sam_vit_b.pth"),
        student="l0",
        image_size=64,
        teacher_cache=str(env / "cache"),
        loop=LoopConfig(output=str(output), **{**defaults, **loop}),
        optim=OptimConfig(lr=1e-3, warmup_steps=1),
        data=DataConfig(path=str(env / "sa1b"), batch_size=1, workers=0, val_images=1),
    )


def _args(env: Path, output: Path, *extra: str) -> list[str]:
    return [
        "distill",
        "--teacher", "vit_b",
        "--teacher-checkpoint", str(env / "sam_vit_b.pth"),
        "--student", "l0",
        "--data", str(env / "sa1b"),
        "--output", str(output),
        "--image-size", "64",
        "--teacher-cache", str(env / "cache"),
        "--batch-size", "1",
        "--workers", "0",
        "--lr", "1e-3",
        "--warmup-steps", "1",
        "--val-images", "1",
        "--log-every", "1",
        "--save-every", "1",
        "--val-every", "0",
        "--device", "cpu",
        "--no-progress",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def cold(env):
    """The only run that calls the teacher: 1 training image over 2 epochs + 1 validation image."""
    output = env / "cold"
    summary = distill(_cfg(env, output))
    return output, summary


def test_cold_run_fills_the_cache_and_second_epoch_skips_the_teacher(env, cold):
    output, summary = cold
    assert summary["teacher_forwards"] == 2  # one training image, one validation image: once each
    train_records = [r for r in metrics_records(output) if "loss" in r]
    assert [(r["epoch"], r["cache_misses"], r["cache_hits"]) for r in train_records] == [(0, 1, 0), (1, 0, 1)]
    assert len(list((env / "cache").glob("vit_b-*/*/*.pt"))) == 2
    meta = json.loads(next((env / "cache").glob("vit_b-*/cache.json")).read_text())
    assert meta["encoder"] == "vit_b" and len(meta["weights_sha256"]) == 64 and meta["dtype"] == "float16"
    val = [r["val_mse"] for r in metrics_records(output) if "val_mse" in r]
    assert len(val) == 2 and all(v > 0 for v in val)


def test_student_file_is_a_complete_model_with_sams_head(env, cold):
    output, _ = cold
    model = create_model("efficientvit-sam-l0", checkpoint=output / "student.pt", input_size=64)  # strict
    teacher_state, _ = read_state_dict(env / "sam_vit_b.pth")
    for key in (
        "mask_decoder.iou_prediction_head.layers.0.weight",
        "prompt_encoder.point_embeddings.0.weight",
    ):
        assert torch.equal(model.state_dict()[key], teacher_state[key])
    ckpt = torch.load(output / "checkpoints" / "last.pt", weights_only=False)
    encoder_state = {
        k.removeprefix("image_encoder."): v for k, v in model.state_dict().items() if "image_encoder" in k
    }
    assert all(torch.equal(encoder_state[k], v) for k, v in ckpt["model"].items())
    assert ckpt["step"] == 2 and (output / "config.json").is_file() and (output / "summary.json").is_file()


@pytest.mark.slow
def test_loss_falls_and_a_killed_run_resumes_exactly(env, cold):
    steps = "4"
    reference = env / "reference"
    summary = distill(_cfg(env, reference, steps=4))
    ref = [r for r in metrics_records(reference) if "loss" in r]
    assert summary["teacher_forwards"] == 0  # warm cache: the teacher is never even built
    assert ref[-1]["loss"] < 0.8 * ref[0]["loss"], [r["loss"] for r in ref]
    val = [r["val_mse"] for r in metrics_records(reference) if "val_mse" in r]
    assert val[-1] < val[0]

    killed = env / "killed"
    last = kill_at_first_checkpoint(_args(env, killed, "--steps", steps), killed, timeout=120)
    assert not (killed / "student.pt").exists()
    done = torch.load(last, weights_only=False)["step"]
    assert 1 <= done < 4

    result = run_evsam("distill", "--output", str(killed), "--resume", "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    resumed = [r for r in metrics_records(killed) if "loss" in r]
    assert [r["step"] for r in resumed] == list(range(1, 5))  # no step lost or logged twice
    # CPU kernels are not bitwise reproducible across processes and Adam amplifies the last bits,
    # so the curves are compared to 0.2 %: consecutive steps differ by several percent, so a
    # restart, a reset optimizer or a lost step would all show.
    for a, b in zip(resumed, ref, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3), (a, b)
        assert a["lr"] == pytest.approx(b["lr"])
        assert a["epoch"] == b["epoch"]
    assert min(abs(ref[i + 1]["loss"] - ref[i]["loss"]) / ref[i]["loss"] for i in range(3)) > 1e-2
    final = torch.load(killed / "student.pt", weights_only=True)["state_dict"]
    expected = torch.load(reference / "student.pt", weights_only=True)["state_dict"]
    torch.manual_seed(0)
    initial = create_model("l0", input_size=64).state_dict()
    keys = [k for k in expected if k.startswith("image_encoder.") and expected[k].is_floating_point()]
    moved = sum(float((expected[k] - initial[k]).norm() ** 2) for k in keys) ** 0.5
    apart = sum(float((final[k] - expected[k]).norm() ** 2) for k in keys) ** 0.5
    assert moved > 0 and apart < 0.05 * moved, (apart, moved)


@pytest.mark.slow
def test_two_process_torchrun(env, cold):
    output = env / "ddp"
    result = run_evsam(*_args(env, output, "--steps", "1", "--val-images", "0"), nproc=2, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 1
    assert summary["images"] == 2  # 2 ranks x 1 step x batch 1, one image each (disjoint shards)
    assert summary["teacher_forwards"] == 0
    assert [r["step"] for r in metrics_records(output)] == [1]
    create_model("l0", checkpoint=output / "student.pt")


runner = CliRunner()


def _error_line(result) -> str:
    text = (result.stderr if hasattr(result, "stderr") else result.output).strip()
    return text.splitlines()[-1] if text else ""


def test_bad_inputs_end_with_one_error_line(env, cold, tmp_path):
    cases = {
        "no SA-1B images": _args(env, tmp_path / "a") + ["--data", str(tmp_path)],
        "--teacher-checkpoint does not fit --teacher vit_h": [
            *_args(env, tmp_path / "b"),
            "--teacher",
            "vit_h",
        ],
        "unknown model 'l9'": [*_args(env, tmp_path / "c"), "--student", "l9"],
        "already holds a training run": _args(env, env / "cold"),
        "nothing to resume": ["distill", "--output", str(tmp_path / "d"), "--resume"],
        "teacher checkpoint not found": [
            *_args(env, tmp_path / "e"),
            "--teacher-checkpoint",
            str(tmp_path / "x.pth"),
        ],
    }
    for needle, args in cases.items():
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (needle, result.output)
        line = _error_line(result)
        assert line.startswith("Error:") and needle in line, (needle, result.output)
        assert "Traceback" not in result.output
    # The wrong-size teacher error names the teacher the file is for.
    result = runner.invoke(app, [*_args(env, tmp_path / "b"), "--teacher", "vit_h"])
    assert "use --teacher vit_b" in result.output
    # --overwrite replaces the refused run (a killed one: only a partial metrics.jsonl).
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "metrics.jsonl").write_text('{"step": 7, "loss": 1.0}\n{"step": 8, "lo')
    result = runner.invoke(app, [*_args(env, tmp_path / "f"), "--steps", "1"])
    assert result.exit_code == 1 and "--overwrite" in result.output
    result = runner.invoke(
        app, [*_args(env, tmp_path / "f"), "--steps", "1", "--val-images", "0", "--overwrite"]
    )
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in metrics_records(tmp_path / "f") if "loss" in r] == [1]


@pytest.mark.gpu
def test_distill_on_gpu_with_amp(env, tmp_path):
    """The teacher (autocast) and the student (AMP) on CUDA; cache misses go to a fresh folder."""
    cfg = _cfg(env, tmp_path / "gpu")
    cfg.loop.device = "cuda"
    cfg.teacher_cache = str(tmp_path / "cache")
    summary = distill(cfg)
    assert summary["teacher_forwards"] == 2 and summary["final_loss"] > 0
    assert len(list((tmp_path / "cache").glob("vit_b-*/*/*.pt"))) == 2

"""`evsam finetune --freeze-encoder`: a frozen image encoder, cached embeddings, the decoder trains.

Generated COCO-format data (`evsam data synth`): 4 images of 64x64, the last one held out. The
cold run fills the cache (4 encoder calls: 3 training images and the validation image); every
later run with the same weights reads it back and never calls the encoder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _util import kill_at_first_checkpoint, metrics_records, run_evsam
from typer.testing import CliRunner

from evsam_cli.cli.app import app
from evsam_cli.data.synthetic import write_coco
from evsam_cli.models import create_model, save_weights
from evsam_cli.train.config import DataConfig, FinetuneConfig, LoopConfig, OptimConfig
from evsam_cli.train.finetune import FrozenEncoder, finetune

IMAGES = 4  # 3 train + 1 held out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("frozen")
    paths = write_coco(root / "coco", num_images=IMAGES, image_size=64, seed=2)
    torch.manual_seed(0)
    save_weights(create_model("l0", input_size=64), root / "init.pt")
    return root, paths


def _cfg(env, output: Path, *, cache: Path, init: str = "init.pt", steps: int = 8) -> FinetuneConfig:
    root, paths = env
    return FinetuneConfig(
        model="l0",
        init=str(root / init),
        image_size=64,
        masks_per_image=2,
        annotations=str(paths["annotations"]),
        freeze_encoder=True,
        embedding_cache=str(cache),
        loop=LoopConfig(
            output=str(output), steps=steps, log_every=1, val_every=4, save_every=2, device="cpu"
        ),
        optim=OptimConfig(lr=1e-3, warmup_steps=1),
        data=DataConfig(path=str(paths["images"]), batch_size=1, workers=0, val_images=1),
    )


def _args(env, output: Path, cache: Path, *extra: str) -> list[str]:
    root, paths = env
    return [
        "finetune",
        "--model", "l0",
        "--init", str(root / "init.pt"),
        "--data", str(paths["images"]),
        "--annotations", str(paths["annotations"]),
        "--output", str(output),
        "--freeze-encoder",
        "--embedding-cache", str(cache),
        "--image-size", "64",
        "--masks-per-image", "2",
        "--batch-size", "1",
        "--workers", "0",
        "--lr", "1e-3",
        "--warmup-steps", "1",
        "--val-images", "1",
        "--val-every", "4",
        "--save-every", "2",
        "--log-every", "1",
        "--steps", "8",
        "--device", "cpu",
        "--no-progress",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def cold(env):
    root, _ = env
    output = root / "cold"
    return output, finetune(_cfg(env, output, cache=root / "cache"))


def _losses(output: Path) -> list[float]:
    return [r["loss"] for r in metrics_records(output) if "loss" in r]


def test_encoder_stays_bit_identical_and_the_decoder_learns(env, cold):
    root, _ = env
    output, summary = cold
    init = torch.load(root / "init.pt", weights_only=True)["state_dict"]
    final = torch.load(output / "model.pt", weights_only=True)["state_dict"]
    encoder = [k for k in init if k.startswith("image_encoder.")]
    assert encoder and all(torch.equal(init[k], final[k]) for k in encoder)  # BN statistics included
    head = [k for k in init if k.startswith(("mask_decoder.", "prompt_encoder.")) and k.endswith("weight")]
    assert sum(not torch.equal(init[k], final[k]) for k in head) > len(head) // 2
    losses = _losses(output)
    # a model that learns nothing stays at its first loss (about 3 here, 1.1-1.5 after 8 steps)
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0], losses
    assert summary["freeze_encoder"] and summary["steps"] == 8 and summary["steps_per_s"] > 0
    assert summary["embedding_cache"]["misses"] == IMAGES  # each image encoded once, the val one included
    folder = Path(summary["embedding_cache"]["folder"])
    assert len(list(folder.glob("*/*.pt"))) == IMAGES
    assert json.loads((folder / "cache.json").read_text())["input_size"] == 64
    train = [r for r in metrics_records(output) if "loss" in r]
    assert all(r["cache_hits"] == 1 and r["cache_misses"] == 0 for r in train)  # the first pass filled it
    create_model("l0", checkpoint=output / "model_best.pt")  # strict load


def test_second_run_reads_every_embedding_and_never_runs_the_encoder(env, cold, monkeypatch):
    root, _ = env
    output, _ = cold

    def no_encoder(self, pixels, hw):
        raise AssertionError("the encoder ran with a warm cache")

    monkeypatch.setattr(FrozenEncoder, "__call__", no_encoder)
    summary = finetune(_cfg(env, root / "warm", cache=root / "cache", steps=4))
    assert summary["embedding_cache"]["misses"] == 0 and summary["embedding_cache"]["hits"] >= IMAGES
    # the warm run trains on exactly what the cold one computed (until its shorter cosine schedule
    # gives other learning rates from step 3 on)
    assert _losses(root / "warm")[:3] == pytest.approx(_losses(output)[:3], rel=1e-5)


def test_changed_checkpoint_or_input_size_never_reads_a_stale_entry(env, cold):
    root, _ = env
    state = torch.load(root / "init.pt", weights_only=True)
    key = next(k for k in state["state_dict"] if k.startswith("image_encoder.") and k.endswith("weight"))
    state["state_dict"][key] = state["state_dict"][key] + 1e-3
    torch.save(state, root / "init2.pt")
    summary = finetune(_cfg(env, root / "changed", cache=root / "cache", init="init2.pt", steps=1))
    assert summary["embedding_cache"]["misses"] == IMAGES
    cfg = _cfg(env, root / "resized", cache=root / "cache", steps=1)
    cfg.image_size = 96
    assert finetune(cfg)["embedding_cache"]["misses"] == IMAGES
    assert len(list((root / "cache").iterdir())) == 3  # one folder per weights / input size


@pytest.mark.slow
def test_killed_frozen_run_resumes_exactly(env, cold):
    root, _ = env
    reference, killed = root / "ref", root / "killed"
    result = run_evsam(*_args(env, reference, root / "cache"))
    assert result.returncode == 0, result.stderr[-2000:]
    kill_at_first_checkpoint(_args(env, killed, root / "cache"), killed, timeout=180)
    result = run_evsam("finetune", "--output", str(killed), "--resume", "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    got, ref = metrics_records(killed), metrics_records(reference)
    assert [(r["step"], "loss" in r) for r in got] == [(r["step"], "loss" in r) for r in ref]
    for a, b in zip(got, ref, strict=True):
        key = "loss" if "loss" in b else "val_iou"
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a, b)
    assert json.loads((killed / "summary.json").read_text())["embedding_cache"]["misses"] == 0


@pytest.mark.slow
def test_two_process_torchrun_shares_one_cache(env, tmp_path):
    cache = tmp_path / "shared"
    args = _args(env, tmp_path / "ddp", cache, "--steps", "2", "--val-every", "0")
    result = run_evsam(*args, nproc=2, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    # the ranks split the first pass: every image encoded once in all, one file each
    assert summary["embedding_cache"]["misses"] == IMAGES
    assert len(list(cache.glob("*/*/*.pt"))) == IMAGES and not list(cache.rglob("*.tmp"))


def test_embedding_cache_needs_freeze_encoder(env, tmp_path):
    args = [a for a in _args(env, tmp_path / "x", tmp_path / "c") if a != "--freeze-encoder"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == "Error: --embedding-cache needs --freeze-encoder"

"""`evsam finetune` end to end on small SA-1B- and COCO-format sets the tests write.

The learning test needs a model to learn something measurable in 8 CPU steps at a 64x64 input:
one large object, and a held-out image whose *content* repeats the training image (its own id
and files), so val_iou measures how the model fits that object, not generalisation. The init
file stands in for a distilled student: random weights whose BatchNorm statistics were measured
on the images (a random init's unit statistics would make eval-mode validation meaningless).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _util import kill_at_first_checkpoint, metrics_records, run_evsam
from PIL import Image
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from evsam_cli.cli.app import app
from evsam_cli.data.images import load_image
from evsam_cli.data.synthetic import write_coco
from evsam_cli.models import create_model, save_weights
from evsam_cli.train.config import DataConfig, FinetuneConfig, LoopConfig, OptimConfig
from evsam_cli.train.finetune import finetune

STEPS = 12


def _write_pair(folder: Path, image_id: int, image: np.ndarray, mask: np.ndarray) -> None:
    h, w = mask.shape
    Image.fromarray(image).save(folder / f"sa_{image_id}.jpg", quality=95)
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    ys, xs = np.nonzero(mask)
    ann = {
        "id": image_id,
        "segmentation": {"size": [h, w], "counts": rle["counts"].decode()},
        "bbox": [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)],
        "area": int(mask.sum()),
        "predicted_iou": 0.9,
        "point_coords": [[float(xs.mean()), float(ys.mean())]],
        "stability_score": 0.95,
        "crop_box": [0.0, 0.0, float(w), float(h)],
    }
    meta = {"image_id": image_id, "width": w, "height": h, "file_name": f"sa_{image_id}.jpg"}
    (folder / f"sa_{image_id}.json").write_text(json.dumps({"image": meta, "annotations": [ann]}))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    data = root / "sa1b"
    data.mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:60, 0:64]
    mask = ((xx - 34) / 20.0) ** 2 + ((yy - 28) / 16.0) ** 2 <= 1
    image = (rng.random((60, 64, 3)) * 60 + 40).astype(np.uint8)
    image[mask] = (220, 190, 70)
    for image_id in (1, 2):  # sa_2 is held out (the last pair)
        _write_pair(data, image_id, image, mask)
    torch.manual_seed(0)
    model = create_model("l0", input_size=64)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration pass
    model.train()
    with torch.no_grad():
        model.image_encoder(model.preprocess(load_image(data / "sa_1.jpg")))
    save_weights(model.eval(), root / "init.pt")
    return root


def _cfg(env: Path, output: Path) -> FinetuneConfig:
    return FinetuneConfig(
        model="l0",
        init=str(env / "init.pt"),
        image_size=64,
        masks_per_image=2,
        loop=LoopConfig(
            output=str(output), steps=STEPS, log_every=1, val_every=4, save_every=2, device="cpu"
        ),
        optim=OptimConfig(lr=5e-4, warmup_steps=1),
        data=DataConfig(path=str(env / "sa1b"), batch_size=1, workers=0, val_images=1),
    )


def _args(env: Path, output: Path, *extra: str) -> list[str]:
    return [
        "finetune",
        "--model", "l0",
        "--init", str(env / "init.pt"),
        "--data", str(env / "sa1b"),
        "--output", str(output),
        "--image-size", "64",
        "--masks-per-image", "2",
        "--batch-size", "1",
        "--workers", "0",
        "--lr", "5e-4",
        "--warmup-steps", "1",
        "--val-images", "1",
        "--val-every", "4",
        "--save-every", "2",
        "--log-every", "1",
        "--steps", str(STEPS),
        "--device", "cpu",
        "--no-progress",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(env):
    """An uninterrupted run in its own process, like the killed/resumed one it is compared with
    (the pytest process's thread and allocator state gives last-bit differences that 12 Adam
    steps amplify; two separate processes agree exactly)."""
    output = env / "reference"
    result = run_evsam(*_args(env, output))
    assert result.returncode == 0, result.stderr[-2000:]
    return output, json.loads((output / "summary.json").read_text())


def test_short_run_raises_val_iou_and_trains_the_encoder(env, reference):
    output, summary = reference
    records = metrics_records(output)
    val = [(r["step"], r["val_iou"]) for r in records if "val_iou" in r]
    assert [s for s, _ in val] == [0, 4, 8, 12]
    train = [r for r in records if "loss" in r]
    # A dozen CPU steps are noisy (thread counts and the torch version change reduction order), so
    # the claims are on trends that a model which learns nothing cannot show: the training loss
    # falls by half (tested: 2.5 -> 0.66 over the first/last three steps; with lr 0 it hovers near
    # its start) and validation ends clearly above step 0 (tested: 26 -> 42-81 depending on the
    # machine; eval-mode BatchNorm makes validation lag the training fit).
    first, last = (sum(r["loss"] for r in part) / 3 for part in (train[:3], train[-3:]))
    assert last < 0.5 * first, [r["loss"] for r in train]
    assert val[-1][1] > val[0][1] + 8, val
    assert [r["multimask"] for r in train] == [0.0, 1.0] * (STEPS // 2)  # every other step: 3 outputs
    assert all({"focal", "dice", "iou_loss", "data_wait_s"} <= r.keys() for r in train)
    # gradients reached the encoder (not only the decoder)
    init = torch.load(env / "init.pt", weights_only=True)["state_dict"]
    final = torch.load(output / "model.pt", weights_only=True)["state_dict"]
    changed = [k for k in init if k.startswith("image_encoder.") and k.endswith("conv.weight")]
    assert changed and all(not torch.equal(init[k], final[k]) for k in changed)
    assert summary["best"]["val_iou"] == pytest.approx(max(v for _, v in val))
    create_model("l0", checkpoint=output / "model_best.pt")  # strict load
    create_model("l0", checkpoint=output / "model.pt")


@pytest.mark.slow
def test_killed_run_resumes_exactly(env, reference):
    ref_out, _ = reference
    killed = env / "killed"
    kill_at_first_checkpoint(_args(env, killed), killed, timeout=180)
    assert not (killed / "model.pt").exists()
    result = run_evsam("finetune", "--output", str(killed), "--resume", "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    got, ref = metrics_records(killed), metrics_records(ref_out)
    assert [(r["step"], "loss" in r) for r in got] == [(r["step"], "loss" in r) for r in ref]
    for a, b in zip(got, ref, strict=True):
        key = "loss" if "loss" in b else "val_iou"
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a, b)


@pytest.fixture(scope="module")
def coco(env):
    return write_coco(env / "coco", num_images=3, image_size=64, seed=1)


def test_coco_format_data(env, coco):
    paths = coco
    output = env / "coco_run"
    result = CliRunner().invoke(
        app,
        [
            *_args(env, output),
            "--data",
            str(paths["images"]),
            "--annotations",
            str(paths["annotations"]),
            "--steps",
            "1",
            "--val-every",
            "0",
        ],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    records = metrics_records(output)
    assert [r["step"] for r in records] == [0, 1, 1] and "val_iou" in records[-1]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["annotations"] == str(paths["annotations"]) and summary["val_images"] == 1
    create_model("l0", checkpoint=output / "model.pt")


@pytest.mark.slow
def test_two_process_torchrun(env):
    output = env / "ddp"
    args = _args(env, output, "--steps", "1", "--val-images", "0", "--init", str(env / "init.pt"))
    result = run_evsam(*args, nproc=2, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["images"] == 2 and summary["steps"] == 1
    create_model("l0", checkpoint=output / "model.pt")


def test_bad_inputs(env, tmp_path):
    runner = CliRunner()
    cases = {
        "no SA-1B images": [*_args(env, tmp_path / "a"), "--data", str(tmp_path)],
        "unknown model": [*_args(env, tmp_path / "b"), "--model", "l9"],
        "annotation file not found": [*_args(env, tmp_path / "c"), "--annotations", str(tmp_path / "x.json")],
        "does not fit model efficientvit-sam-l1": [*_args(env, tmp_path / "d"), "--model", "l1"],
        "nothing to resume": ["finetune", "--output", str(tmp_path / "e"), "--resume"],
    }
    for needle, args in cases.items():
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (needle, result.output)
        line = result.output.strip().splitlines()[-1]
        assert line.startswith("Error:") and needle in line, (needle, result.output)
    assert not (tmp_path / "d").exists()  # a bad --init leaves no half-made run folder


def test_finetuned_model_goes_to_eval(env, reference, coco):
    """The last stage of the documented pipeline: `evsam eval` reads the finetuned weights."""
    output, _ = reference
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "coco",
            "--images",
            str(coco["images"]),
            "--annotations",
            str(coco["annotations"]),
            "--model",
            "l0",
            "--checkpoint",
            str(output / "model_best.pt"),
            "--prompt",
            "box",
            "--limit",
            "1",
            "--output",
            str(env / "eval"),
        ],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((env / "eval" / "metrics.json").read_text())
    assert metrics["num_images"] == 1 and 0 <= metrics["miou"]["all"] <= 100


@pytest.mark.gpu
def test_amp_on_gpu(env, tmp_path):
    """AMP path (bf16 autocast, or fp16 with loss scaling) trains with finite losses on CUDA."""
    cfg = _cfg(env, tmp_path / "gpu")
    cfg.loop.device = "cuda"
    cfg.loop.steps = 4
    summary = finetune(cfg)
    losses = [r["loss"] for r in metrics_records(tmp_path / "gpu") if "loss" in r]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert summary["val_iou"] is not None

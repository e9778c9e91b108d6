"""The shared loop with a tiny model on real SA-1B-format data: schedule, decay groups, accumulation,
non-finite loss, metrics.jsonl and output-folder rules."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from evsam_cli.data.sa1b import BatchStream, Sa1bStream, collate_stack, open_sa1b
from evsam_cli.data.synthetic import write_sa1b
from evsam_cli.train.config import ConfigError, LoopConfig, OptimConfig
from evsam_cli.train.loop import TrainingError, build_optimizer, lr_at, prepare_output, train


def _features(record, rng):
    return {
        "image_id": record.image_id,
        "x": torch.from_numpy(record.image.reshape(-1, 3).mean(0) / 255).float(),
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    write_sa1b(root, num_images=6, image_size=40, seed=1)
    return open_sa1b(root, val_images=0)


def _stream(source, batch):
    ds = Sa1bStream(source, transform=_features, collate=collate_stack, batch_size=batch, seed=0)
    return BatchStream(ds, num_workers=0)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        return self.out(self.norm(self.fc(x)))


def _loss(model, batch):
    return ((model(batch["x"]) - 1) ** 2).mean(), {"half": 0.5}


def test_warmup_then_cosine_to_the_floor():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    lrs = [lr_at(s, 14, cfg) for s in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == pytest.approx(1.0) and all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))
    assert lr_at(14, 14, cfg) == pytest.approx(0.1)
    assert lrs[9] == pytest.approx(0.55)  # halfway through the cosine


def test_no_weight_decay_on_norms_and_biases():
    model = Tiny()
    model.out.weight.requires_grad_(False)
    decay, no_decay = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.1)).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model.fc.weight)}
    assert {id(p) for p in no_decay["params"]} == {
        id(p) for p in (model.fc.bias, model.norm.weight, model.norm.bias, model.out.bias)
    }


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="^steps must be >= 1") as info:
        LoopConfig(steps=0)
    assert info.value.params == ("steps",)
    with pytest.raises(ConfigError, match="^lr must be positive"):
        OptimConfig(lr=-1)


def _run(tmp_path, source, *, batch, accum, steps=1, loss=_loss, **kw):
    model = Tiny()
    result = train(
        model=model,
        loss_fn=loss,
        stream=_stream(source, batch),
        loop=LoopConfig(
            output=str(tmp_path), steps=steps, grad_accum=accum, log_every=1, save_every=100, device="cpu"
        ),
        optim=OptimConfig(lr=0.1, warmup_steps=0, grad_clip=0),
        device=torch.device("cpu"),
        config={},
        **kw,
    )
    return model, result


def test_gradient_accumulation_equals_the_larger_batch(tmp_path, data):
    grads = []

    def capture(optimizer, args, kwargs):
        grads.append([p.grad.clone() for g in optimizer.param_groups for p in g["params"]])

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handle = register_optimizer_step_pre_hook(capture)
    try:
        _run(tmp_path / "a", data, batch=4, accum=1)
        _, result = _run(tmp_path / "b", data, batch=2, accum=2)
        _run(tmp_path / "c", data, batch=2, accum=1)
    finally:
        handle.remove()
    big, accumulated, single = grads
    for a, b in zip(big, accumulated, strict=True):
        torch.testing.assert_close(a, b)
    assert any(not torch.allclose(a, c) for a, c in zip(big, single, strict=True))
    assert result.images == 4


def test_metrics_jsonl_checkpoint_and_weights(tmp_path, data):
    saved = []
    _, result = _run(
        tmp_path,
        data,
        batch=2,
        accum=1,
        steps=5,
        save_weights=lambda m, p: saved.append(p.name),
        weights_name="w.pt",
    )
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    for r in records:
        assert {"loss", "lr", "epoch", "data_wait_s", "step_s", "images_per_s", "half"} <= r.keys()
        assert r["data_wait_s"] >= 0 and r["half"] == 0.5
    assert records[-1]["epoch"] == 1  # 6 images, batch 2: step 4 starts the second epoch
    assert saved == ["w.pt"] and result.steps == 5
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["step"] == 5 and ckpt["data"][0]["epoch"] == 1
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_non_finite_loss_stops_with_an_error(tmp_path, data):
    def exploding(model, batch):
        loss, parts = _loss(model, batch)
        return loss * float("nan") if batch["step"] == 2 else loss, parts

    with pytest.raises(TrainingError, match="non-finite.*step 3"):
        _run(tmp_path, data, batch=1, accum=1, steps=5, loss=exploding)


def test_output_folder_rules(tmp_path):
    prepare_output(tmp_path / "new", resume=False, overwrite=False)  # empty or missing: fine
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "notes.txt").write_text("mine")
    with pytest.raises(TrainingError, match="--resume.*--overwrite"):
        prepare_output(run, resume=False, overwrite=False)
    with pytest.raises(TrainingError, match="nothing to resume"):
        prepare_output(run, resume=True, overwrite=False)
    prepare_output(run, resume=False, overwrite=True)
    assert not (run / "metrics.jsonl").exists() and (run / "notes.txt").exists()  # only run files go


def test_epochs_become_steps(tmp_path):
    from evsam_cli.data.sa1b import count_train_images
    from evsam_cli.train.loop import steps_for_epochs

    write_sa1b(tmp_path, num_images=7, image_size=32, shards=2, seed=0)
    source = open_sa1b(tmp_path, val_images=2)  # the last shard's first 2 samples are held out
    assert count_train_images(source) == 5
    assert steps_for_epochs(2, 5, batch_size=2, grad_accum=1, world_size=2) == 3  # ceil(10 / 4)

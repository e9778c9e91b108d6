"""Settings are declared once: the command line's defaults and choices are the library's, Python
and CLI runs with the same values are the same run, and errors name library parameters (the CLI
shows them as its flags)."""

from __future__ import annotations

import dataclasses
import inspect
import logging

import pytest
from typer.testing import CliRunner

from evsam_cli.cli.app import app
from evsam_cli.cli.distill import distill_cli
from evsam_cli.cli.finetune import finetune_cli
from evsam_cli.cli.predict import predict_cli
from evsam_cli.errors import SettingError
from evsam_cli.predictor.amg_settings import AmgConfigError, AmgSettings
from evsam_cli.train.config import (
    TEACHERS,
    ConfigError,
    DataConfig,
    DistillConfig,
    FinetuneConfig,
    LoopConfig,
    OptimConfig,
    defaults,
    finalize,
    to_dict,
)

runner = CliRunner()


class Captured(Exception):
    """Stops a command right after it built its configuration."""


def _capture(monkeypatch, module: str, name: str) -> dict:
    seen = {}

    def fake(config, **kwargs):
        seen["config"] = config
        raise Captured

    monkeypatch.setattr(f"evsam_cli.train.{module}.{name}", fake)
    return seen


@pytest.mark.parametrize("cli, cls", [(distill_cli, DistillConfig), (finetune_cli, FinetuneConfig)])
def test_train_commands_take_their_defaults_from_the_library(cli, cls):
    library = defaults(cls)
    params = inspect.signature(cli).parameters
    required = ("output", "teacher_checkpoint")  # no default: the CLI asks for them
    shared = [name for name in params if name in library and name not in required]
    assert len(shared) >= 18
    for name in shared:
        assert params[name].default == library[name], name


def test_distill_cli_builds_the_python_config(monkeypatch, tmp_path):
    seen = _capture(monkeypatch, "distill", "distill")
    args = ["distill", "--teacher-checkpoint", "t.pth", "--data", "d", "--output", str(tmp_path)]
    result = runner.invoke(app, args)
    assert isinstance(result.exception, Captured), result.output
    python = DistillConfig(
        teacher_checkpoint="t.pth", loop=LoopConfig(output=str(tmp_path)), data=DataConfig(path="d")
    )
    # The loop section came from LoopConfig(): only its output differs from distill's default one.
    assert to_dict(seen["config"]) == to_dict(python)


def test_finetune_cli_builds_the_python_config(monkeypatch, tmp_path):
    seen = _capture(monkeypatch, "finetune", "finetune")
    result = runner.invoke(
        app, ["finetune", "--data", "d", "--output", str(tmp_path), "--lr", "3e-4", "--steps", "7"]
    )
    assert isinstance(result.exception, Captured), result.output
    python = FinetuneConfig(
        loop=LoopConfig(output=str(tmp_path), steps=7), optim=OptimConfig(lr=3e-4), data=DataConfig(path="d")
    )
    assert to_dict(seen["config"]) == to_dict(python)
    # Sections given without the command's own settings still get them.
    assert python.data.batch_size == 2 and python.loop.val_every == 500
    assert FinetuneConfig(optim=OptimConfig(weight_decay=0.1)).optim.lr == 1e-4
    assert DistillConfig(teacher_checkpoint="t", optim=OptimConfig()).optim.lr == 1e-3


def test_teacher_choices_are_the_library_list():
    result = runner.invoke(app, ["distill", "--help"], env={"COLUMNS": "200"})
    assert "|".join(TEACHERS) in result.output


def test_library_errors_name_parameters_and_the_cli_shows_flags(tmp_path):
    with pytest.raises(ConfigError, match=r"^lr must be positive") as info:
        OptimConfig(lr=-1.0)
    assert info.value.params == ("lr",) and isinstance(info.value, SettingError)
    with pytest.raises(ConfigError, match=r"^masks_per_image must be >= 1"):
        FinetuneConfig(masks_per_image=0)
    result = runner.invoke(app, ["finetune", "--data", "d", "--output", str(tmp_path), "--lr", "-1"])
    assert result.exit_code == 1
    assert result.stderr.strip() == "Error: --lr must be positive, got -1.0"


def test_amg_settings_are_declared_once():
    params = inspect.signature(predict_cli, eval_str=True).parameters
    for f in dataclasses.fields(AmgSettings):
        if f.name in params:  # the CLI's None means "not given": the library default applies
            assert params[f.name].default is None
            info = params[f.name].annotation.__metadata__[0]
            assert info.help.startswith(AmgSettings.help(f.name))
            assert info.help.endswith((f"[default: {f.default}]", f"[default: {f.default:g}]"))
    with pytest.raises(AmgConfigError, match="^pred_iou_thresh must be a number in"):
        AmgSettings(pred_iou_thresh=2)
    assert AmgSettings(points_per_side=4).to_dict()["points_per_side"] == 4


def test_finalize_picks_from_the_run_and_warns_about_odd_choices(caplog, monkeypatch):
    cfg = FinetuneConfig(loop=LoopConfig(steps=30))
    finalize(cfg, val_images=1)
    assert cfg.optim.warmup_steps == 3 and cfg.data.val_images == 1
    assert 0 <= cfg.data.workers <= 4
    long = FinetuneConfig(loop=LoopConfig(steps=100000))
    finalize(long, val_images=16)
    assert long.optim.warmup_steps == 250
    monkeypatch.setattr("evsam_cli.train.config.cores_per_process", lambda: 2)
    odd = FinetuneConfig(
        loop=LoopConfig(steps=30), optim=OptimConfig(warmup_steps=500), data=DataConfig(workers=8)
    )
    with caplog.at_level(logging.WARNING, logger="evsam.train"):
        finalize(odd, val_images=1)
    text = caplog.text
    assert "warmup_steps=500 >= steps=30" in text and "workers=8 is more than the 2 core(s)" in text
    assert odd.optim.warmup_steps == 500 and odd.data.workers == 8  # warned about, not changed

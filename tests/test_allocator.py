"""The CPU allocator tuning is a safe, idempotent process-wide switch."""

from __future__ import annotations

import platform
import sys

import pytest

import evsam_cli


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_tune_cpu_allocator_applies_on_glibc():
    assert evsam_cli.tune_cpu_allocator() is True
    assert evsam_cli.tune_cpu_allocator() is True  # idempotent


def test_cli_start_tunes_the_allocator(monkeypatch):
    from typer.testing import CliRunner

    from evsam_cli.cli import app as app_module

    calls = []
    monkeypatch.setattr(app_module, "tune_cpu_allocator", lambda: calls.append(1) or True)
    result = CliRunner().invoke(app_module.app, ["models"])
    assert result.exit_code == 0, result.output
    assert calls == [1]

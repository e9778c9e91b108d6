"""The CPU allocator tuning is a safe, idempotent process-wide switch."""

from __future__ import annotations

import os
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


_REUSE = """
import ctypes, resource, sys
from evsam_cli.accel.allocator import tune_cpu_allocator, tune_cpu_allocator_for_training
if sys.argv[1] == "training":
    assert tune_cpu_allocator_for_training() is True
    assert tune_cpu_allocator_for_training() is True  # idempotent
else:
    assert tune_cpu_allocator() is True
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.memset.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)
libc.free.argtypes = (ctypes.c_void_p,)
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(96 << 20)  # above the largest mmap threshold glibc accepts
    libc.memset(p, 1, 96 << 20)
    libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults[-1])
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_training_tuning_reuses_blocks_above_the_mmap_threshold():
    """A 96 MiB block freed and allocated again is page-faulted in again under the inference
    tuning (glibc mmaps it), but comes back from the heap under the training tuning."""
    import subprocess

    pages = (96 << 20) // os.sysconf("SC_PAGE_SIZE")

    def faults(setting: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _REUSE, setting], capture_output=True, text=True, check=True
        )
        return int(out.stdout)

    assert faults("inference") > pages // 2
    assert faults("training") < pages // 20


def test_training_on_cpu_tunes_the_allocator(monkeypatch):
    from evsam_cli.train import loop

    calls = []
    monkeypatch.setattr(loop, "tune_cpu_allocator_for_training", lambda: calls.append(1) or True)
    device, _ = loop.init_device("cpu")
    assert device.type == "cpu" and calls == [1]

"""Helpers for tests that start real subprocesses (killed runs, torchrun) and read run folders."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# Child processes: the same thread count as this process, unbuffered output for killed runs.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}


def free_port() -> str:
    """A TCP port free on the loopback interface right now (for torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def evsam_cmd(*args: str) -> list[str]:
    """``evsam ARGS`` as a command line for this interpreter."""
    return [sys.executable, "-m", "evsam_cli", *args]


def torchrun_cmd(*args: str, nproc: int = 2) -> list[str]:
    """``evsam ARGS`` under torchrun with ``nproc`` processes on a free rendezvous port."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    return [*torchrun, "--master-port", free_port(), "-m", "evsam_cli", *args]


def run_evsam(*args: str, nproc: int = 1, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``evsam ARGS`` in its own process, or with ``nproc`` > 1 under torchrun; text output captured."""
    cmd = torchrun_cmd(*args, nproc=nproc) if nproc > 1 else evsam_cmd(*args)
    return subprocess.run(cmd, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=timeout)


def kill_at_first_checkpoint(args: list[str], output: Path, timeout: float) -> Path:
    """Start the training command ``evsam ARGS`` and SIGKILL it once ``OUTPUT/checkpoints/last.pt``
    exists; returns that checkpoint's path."""
    proc = subprocess.Popen(
        evsam_cmd(*args), env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    last = output / "checkpoints" / "last.pt"
    deadline = time.time() + timeout
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    return last


def metrics_records(output: Path) -> list[dict]:
    """The records of a run's ``OUTPUT/metrics.jsonl``, in order."""
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]

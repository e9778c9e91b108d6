"""Helpers for tests that start real subprocesses (killed runs, torchrun)."""

from __future__ import annotations

import os
import socket

# Child processes: the same thread count as this process, unbuffered output for killed runs.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}


def free_port() -> str:
    """A TCP port free on the loopback interface right now (for torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])

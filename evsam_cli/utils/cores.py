"""How many CPU cores a process has, and how many data readers that leaves (torch-free, so the
commands' settings can use it before torch is imported)."""

from __future__ import annotations

import os


def cores_per_process() -> int:
    """The cores this process may use, shared by the processes torchrun starts on this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def default_workers() -> int:
    """Data readers per process (training's loader workers, evaluation's reader threads): its cores
    less one for the model itself, at most 4."""
    return max(0, min(4, cores_per_process() - 1))

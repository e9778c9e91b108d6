"""Timing a callable: warm-up calls first (never timed), then one measurement per call.

On CUDA each call is bracketed by CUDA events and synchronised, so the time is the GPU's; on
the CPU it is ``time.perf_counter``. Summaries are the median and the 90th percentile.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Timing:
    seconds: tuple[float, ...]  # one entry per timed call

    @property
    def median_s(self) -> float:
        return float(np.median(self.seconds))

    @property
    def p90_s(self) -> float:
        return float(np.percentile(self.seconds, 90))

    def latency_ms(self) -> dict[str, float]:
        return {"median": round(self.median_s * 1e3, 3), "p90": round(self.p90_s * 1e3, 3)}

    def per_second(self, items: int) -> float:
        """Items processed per second at the median call time."""
        return items / self.median_s if self.median_s > 0 else float("inf")


def measure(
    fn: Callable[[], Any],
    *,
    warmup: int,
    iters: int,
    cuda: bool = False,
    on_step: Callable[[], None] | None = None,
) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``iters`` times timed.

    ``warmup`` must be at least 1: the first call pays for lazy initialisation (allocator,
    kernel selection, graph optimisation) and is never timed.
    """
    if warmup < 1:
        raise ValueError(f"warmup must be at least 1 (the first call is never timed), got {warmup}")
    if iters < 1:
        raise ValueError(f"iters must be at least 1, got {iters}")
    sync = _cuda_sync() if cuda else None
    for _ in range(warmup):
        fn()
        if sync:
            sync()
        if on_step:
            on_step()
    times = []
    for _ in range(iters):
        if cuda:
            times.append(_time_cuda(fn))
        else:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        if on_step:
            on_step()
    return Timing(tuple(times))


def _cuda_sync() -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize


def _time_cuda(fn: Callable[[], Any]) -> float:
    import torch

    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3

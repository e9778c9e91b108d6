"""Decoder passes over many prompts of one image, on two CPU threads where that pays.

On a CPU the decoder's time is split between matrix products, which PyTorch's intra-op threads
share well, and memory-bound passes (LayerNorms, softmaxes, copies, the exact GELU), which they
share badly. Two halves of the prompts decoded at once by two Python threads with one intra-op
thread each overlap one half's memory-bound steps with the other's products (PyTorch releases
the GIL inside its kernels). The split pays only when each thread has enough prompts
(``MIN_PROMPTS_PER_THREAD``; docs/benchmarks.md has the measurements). Prompts are
independent, so the results are those of one thread, up to float rounding.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")

_WORKER_NAME = "evsam-passes"
# Each thread's share of the prompts must be at least this large for the split to pay.
MIN_PROMPTS_PER_THREAD = 8


def chunks(start: int, stop: int, step: int) -> Iterator[slice]:
    """Consecutive slices of ``start:stop``, at most ``step`` long."""
    step = max(1, step)
    for lo in range(start, stop, step):
        yield slice(lo, min(lo + step, stop))


def map_passes(fn: Callable[[slice], T], n: int, step: int, device: torch.device) -> list[T]:
    """``fn`` over consecutive slices of ``n`` prompts, at most ``step`` each; results in order.

    On a CPU with at least two intra-op threads and at least ``2 * MIN_PROMPTS_PER_THREAD``
    prompts, the first half of the slices runs in the calling thread and the second in a worker
    thread, concurrently, each with half the intra-op threads (the calling thread's setting is
    restored afterwards). ``fn`` must be safe to run from two threads at once on disjoint
    slices; it sets its own grad mode (that is per thread).
    """
    threads = torch.get_num_threads()
    if (
        device.type != "cpu"
        or threads < 2
        or n < 2 * MIN_PROMPTS_PER_THREAD
        or threading.current_thread().name.startswith(_WORKER_NAME)  # called from fn itself
    ):
        return [fn(sl) for sl in chunks(0, n, step)]
    half = -(-n // 2)

    def run(start: int, stop: int) -> list[T]:
        torch.set_num_threads(threads // 2)
        return [fn(sl) for sl in chunks(start, stop, step)]

    future = _worker(os.getpid()).submit(run, half, n)
    try:
        first = run(0, half)
    finally:
        # Wait for the worker, error or not, before restoring the calling thread's setting
        # (which also resets the process-wide default that new threads start from).
        future.exception()
        torch.set_num_threads(threads)
    return first + future.result()


@functools.cache
def _worker(pid: int) -> ThreadPoolExecutor:
    """One long-lived worker thread (so OpenMP keeps its thread team between calls), per process:
    a forked child inherits the executor but not its thread, and would wait on it forever."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=_WORKER_NAME)

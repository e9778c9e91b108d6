"""Process-level glibc malloc tuning for CPU inference and training (torch-free, so the CLI can apply it
at start)."""

from __future__ import annotations

import functools

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4


@functools.cache
def tune_cpu_allocator() -> bool:
    """Let glibc's malloc keep freed memory for reuse instead of handing it back to the OS.

    CPU inference allocates and frees tensors of several MiB per decoder pass. By default glibc
    serves those from fresh ``mmap`` pages or trims its heap after each free, so every pass pays
    the kernel's page faults and zero-filling again: a quarter to a third of the CPU decoder's
    time on the machine of docs/benchmarks.md. This raises the mmap threshold to its maximum
    (32 MiB), keeps up to 1 GiB of freed heap and pads heap growth by 64 MiB (the same knobs as
    the ``MALLOC_*_`` environment variables). The cost is a process that holds on to memory it
    has freed. Process-wide and idempotent; a no-op (returning False) off glibc.

    The ``evsam`` command calls this at start; library users opt in by calling it once.
    """
    settings = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20))
    return _mallopt(settings)


@functools.cache
def tune_cpu_allocator_for_training() -> bool:
    """On top of ``tune_cpu_allocator``: serve every allocation from the heap and never shrink it.

    A training step's largest tensors (the mask decoder's upscaling activations and their
    gradients, the upsampled mask logits, the loss temporaries) are each larger than 32 MiB, the
    highest mmap threshold glibc accepts. So even with ``tune_cpu_allocator`` each of them is a
    fresh ``mmap`` on allocation and a ``munmap`` on free, and every step pays the kernel again to
    fault in and zero-fill gigabytes of pages: most of a CPU training step's system time. Turning
    mmap off (``M_MMAP_MAX`` 0) puts those blocks on the heap, where the next step finds them again
    freed; trimming is turned off too (``M_TRIM_THRESHOLD`` -1), since the heap's top is where a
    step's peak lives and handing it back would refault it on the next step. The process then holds
    on to its peak step memory for its whole life, which a training run reaches every step anyway.
    Process-wide and idempotent; a no-op (returning False) off glibc.

    ``evsam distill`` and ``evsam finetune`` call this when they train on the CPU; inference
    processes (``evsam predict``, ``eval``, ``bench``) keep mmap for their few large buffers, so
    their memory goes back to the system when they free it.
    """
    tune_cpu_allocator()
    return _mallopt(((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))


def _mallopt(settings: tuple[tuple[int, int], ...]) -> bool:
    import ctypes
    import platform
    import sys

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, value) == 1 for param, value in settings)

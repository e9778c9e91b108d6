"""Process-level tuning for CPU inference (torch-free, so the CLI can apply it at start)."""

from __future__ import annotations

import functools

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


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
    import ctypes
    import platform
    import sys

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    settings = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20))
    return all(mallopt(param, value) == 1 for param, value in settings)

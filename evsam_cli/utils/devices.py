"""Device selection with a clear error when the requested accelerator is absent."""

from __future__ import annotations

import torch

from ..errors import DeviceError


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/"auto" -> cuda if available else cpu; "cuda[:i]" without a GPU -> ``DeviceError``."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {device!r} was requested but no CUDA GPU is available (use device 'cpu')"
            ).naming("device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r} does not exist: {torch.cuda.device_count()} GPU(s) visible")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("device 'mps' was requested but MPS is not available")
    return dev


def device_name(device: torch.device) -> str:
    """Human-readable name of the device: the GPU model or the CPU brand."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "cpu"

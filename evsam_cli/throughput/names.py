"""The engines ``evsam bench`` can time, by name (light: the CLI builds its choices from here).

``torch`` and ``compile`` run the model itself (eager, or ``torch.compile``); every runtime
registered in ``export.runtimes`` is an engine too, timed on its exported files.
"""

from __future__ import annotations

from ..export.runtimes import RUNTIMES

TORCH_ENGINES = ("torch", "compile")
DTYPES = ("fp32", "fp16", "bf16", "int8")  # int8: onnxruntime only (a quantized encoder.onnx)


def engine_names() -> tuple[str, ...]:
    """What ``evsam bench --engine`` takes: the torch engines, then the registered export runtimes."""
    return (*TORCH_ENGINES, *RUNTIMES)

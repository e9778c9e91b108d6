"""Benchmarking: throughput and latency across engines, beside the paper's figures.

Names are imported on first use, so that reading the engine choices (``names``) loads neither
numpy nor torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .names import DTYPES, TORCH_ENGINES, engine_names

_LAZY = {
    "BenchError": ".engines",
    "make_engine": ".engines",
    "plot_throughput": ".plot",
    "read_metrics": ".plot",
    "GPUS": ".reference",
    "PAPER": ".reference",
    "SOURCE": ".reference",
    "PaperFigures": ".reference",
    "device_matches": ".reference",
    "paper_figures": ".reference",
    "reference_for": ".reference",
    "DEFAULT_REPEATS": ".run",
    "bench_zoo": ".run",
    "run_bench": ".run",
    "Timing": ".timing",
    "measure": ".timing",
}

__all__ = ["DTYPES", "TORCH_ENGINES", "engine_names", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

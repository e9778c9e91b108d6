"""Benchmarking: throughput and latency across engines, beside the paper's figures."""

from .engines import DTYPES, ENGINES, BenchError, make_engine
from .plot import plot_throughput, read_metrics
from .reference import GPUS, PAPER, SOURCE, PaperFigures, device_matches, paper_figures, reference_for
from .run import DEFAULT_REPEATS, bench_zoo, run_bench
from .timing import Timing, measure

__all__ = [
    "DEFAULT_REPEATS",
    "DTYPES",
    "ENGINES",
    "GPUS",
    "PAPER",
    "SOURCE",
    "BenchError",
    "PaperFigures",
    "Timing",
    "bench_zoo",
    "device_matches",
    "make_engine",
    "measure",
    "paper_figures",
    "plot_throughput",
    "read_metrics",
    "reference_for",
    "run_bench",
]

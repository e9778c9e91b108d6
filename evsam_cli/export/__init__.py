"""Exporting models (ONNX, TensorRT) and running the exported files.

``OnnxSamPredictor`` needs only numpy, Pillow and onnxruntime; the exporters (which need torch)
and the TensorRT pieces are imported on first use, so ``from evsam_cli.export import
OnnxSamPredictor`` does not load PyTorch. The runtimes (onnxruntime, TensorRT) are registered in
``runtimes``, which imports nothing heavy (the CLI reads its choices there).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .errors import ExportError
from .runtimes import RUNTIMES, ExportRuntime, get_runtime, register_runtime, runtime_for_format

_LAZY = {
    "bilinear_matrix": "..data.frames",
    "ExportedSamPredictor": ".runtime",
    "OnnxSamPredictor": ".runtime",
    "postprocess_matrices": ".runtime",
    "export_onnx": ".onnx",
    "OnnxExport": ".onnx",
    "DecoderOnnxWrapper": ".onnx",
    "EncoderOnnxWrapper": ".onnx",
    "measure_parity": ".parity",
    "Tolerance": ".parity",
    "synthetic_image": ".parity",
    "export_model": ".pipeline",
    "TrtSamPredictor": ".tensorrt",
    "TrtRunner": ".tensorrt",
    "build_engine": ".tensorrt",
    "encoder_profile": ".tensorrt",
    "decoder_profile": ".tensorrt",
    "plan_bindings": ".tensorrt",
    "TensorSpec": ".tensorrt",
}

__all__ = [
    "RUNTIMES",
    "ExportError",
    "ExportRuntime",
    "get_runtime",
    "register_runtime",
    "runtime_for_format",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

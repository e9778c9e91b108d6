"""Exporting models (ONNX, TensorRT) and running the exported files.

``OnnxSamPredictor`` needs only numpy, Pillow and onnxruntime; the exporters (which need torch)
and the TensorRT pieces are imported on first use, so ``from evsam_cli.export import
OnnxSamPredictor`` does not load PyTorch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from ..data.frames import bilinear_matrix
from .errors import ExportError
from .runtime import ExportedSamPredictor, OnnxSamPredictor, postprocess_matrices

_LAZY = {
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
    "ExportError",
    "ExportedSamPredictor",
    "OnnxSamPredictor",
    "bilinear_matrix",
    "postprocess_matrices",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

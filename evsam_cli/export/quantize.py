"""Static int8 quantization of the exported image encoder (onnxruntime QDQ).

``quantize_encoder`` rewrites a float32 ``encoder.onnx`` into a QDQ graph: int8 weights and
uint8 activations around the convolutions, with scales calibrated on real images preprocessed
exactly as the exported runtime preprocesses them (``ExportedSamPredictor.preprocess``). The
decoder stays float32: it is a small share of an image's time and its mask logits are what the
threshold reads.

What stays float by default (``DEFAULT_KEEP_FLOAT``; measured in docs/precision.md):

* ``"normalisation"``: the LayerNorms and LiteMLA's linear attention (ReLU kernels, the
  ``V K^T`` and normaliser sums, the division), the nodes ``export/onnx.py`` tags as float32
  (``FP32_TAG``). Quantized, they nearly tripled the embedding error.
* ``"resize"``: the neck's resizes (MatMuls against constant bicubic weights): quantizing them
  added quantize/dequantize pairs for no accuracy or speed gain.

Optional: ``"elementwise"`` quantizes only Conv and MatMul, so GELU and the residual Adds run in
float between a DequantizeLinear and the next QuantizeLinear: slightly smaller error, slower.
Weights are quantized per output channel: BatchNorm folding gives every channel its own scale.

The default calibration set, when no folder is given, is ``DEFAULT_CALIBRATION`` of evsam's own
generated photographs (``data/synthetic.py``: textured backgrounds and objects): always
available and reproducible; a few of the user's own images calibrate better.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, MissingDependencyError
from ..utils.io import atomic_path
from .errors import ExportError
from .onnx import FP32_TAG

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_CALIBRATION = 8  # generated photographs when no folder is given
MAX_CALIBRATION = 64  # images read from a folder (sorted by name)
KEEP_FLOAT_CHOICES = ("normalisation", "resize", "elementwise")
DEFAULT_KEEP_FLOAT = ("normalisation", "resize")


@dataclass(frozen=True)
class CalibrationImage:
    name: str
    image: np.ndarray  # HxWx3 uint8 RGB


def synthetic_calibration(count: int = DEFAULT_CALIBRATION, seed: int = 0) -> list[CalibrationImage]:
    """``count`` generated 640x480 photographs (fixed seed): the default calibration set."""
    from ..data.synthetic import synth_image

    rng = np.random.default_rng(seed)
    return [
        CalibrationImage(f"synthetic-{i}", synth_image(rng, 480, 640, int(rng.integers(3, 9)))[0])
        for i in range(count)
    ]


def calibration_images(
    folder: str | os.PathLike[str] | None, *, limit: int = MAX_CALIBRATION
) -> list[CalibrationImage]:
    """The images of ``folder`` (sorted by name, at most ``limit``), or the synthetic default set."""
    if folder is None:
        return synthetic_calibration()
    from ..data.images import load_image

    path = Path(folder)
    if not path.is_dir():
        raise DataError(f"calibration folder not found: {path}")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in calibration folder {path}")
    return [CalibrationImage(p.name, load_image(p)) for p in files]


def _import_quantization() -> Any:
    try:
        from onnxruntime import quantization
    except ImportError:
        raise MissingDependencyError("onnxruntime", "all", "int8 quantization") from None
    return quantization


def _calibration_reader(quantization: Any, inputs: Sequence[np.ndarray], input_name: str) -> Any:
    class Reader(quantization.CalibrationDataReader):
        def __init__(self) -> None:
            self._it: Iterator[np.ndarray] = iter(inputs)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self._it, None)
            return None if x is None else {input_name: x}

        def rewind(self) -> None:
            self._it = iter(inputs)

    return Reader()


def float_nodes(model_proto: Any, keep_float: Sequence[str]) -> tuple[list[str], list[str]]:
    """(nodes to exclude from quantization, op types to quantize) for ``keep_float``."""
    unknown = sorted(set(keep_float) - set(KEEP_FLOAT_CHOICES))
    if unknown:
        raise ExportError(f"unknown keep-float groups {unknown}: use any of {', '.join(KEEP_FLOAT_CHOICES)}")
    exclude = []
    for node in model_proto.graph.node:
        tagged = node.name.startswith(FP32_TAG)
        if ("normalisation" in keep_float and tagged) or (
            "resize" in keep_float and node.op_type == "MatMul" and not tagged
        ):
            exclude.append(node.name)
    if "elementwise" in keep_float:
        op_types = ["Conv", "MatMul"]
    else:
        op_types = ["Conv", "MatMul", "Add", "Mul", "Gelu", "Relu", "Concat", "Div", "Transpose", "Reshape"]
    return exclude, op_types


def quantize_encoder(
    fp32_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    images: Sequence[CalibrationImage],
    per_channel: bool = True,
    keep_float: Sequence[str] = DEFAULT_KEEP_FLOAT,
    calibration_method: str = "minmax",
) -> dict[str, Any]:
    """Write a statically quantized (QDQ, int8 weights, uint8 activations) copy of the exported
    encoder ``fp32_path`` to ``out_path`` (atomically; the two may be the same file).

    Args:
      images: calibration images (``calibration_images``), preprocessed as the runtime does.
      per_channel: one weight scale per output channel (else one per tensor).
      keep_float: node groups left in float (``KEEP_FLOAT_CHOICES``).
      calibration_method: "minmax", "entropy" or "percentile" (onnxruntime's calibrators).
    Returns:
      what ``export.json`` records under ``"quantization"``.
    """
    import onnx

    from .runtime import PIXEL_MEAN, PIXEL_STD, ExportedSamPredictor, graph_metadata, open_session

    quantization = _import_quantization()
    methods = {
        "minmax": quantization.CalibrationMethod.MinMax,
        "entropy": quantization.CalibrationMethod.Entropy,
        "percentile": quantization.CalibrationMethod.Percentile,
    }
    if calibration_method not in methods:
        raise ExportError(
            f"unknown calibration method {calibration_method!r}: use one of {', '.join(methods)}"
        )
    if not images:
        raise DataError("quantization needs at least one calibration image")
    fp32_path = Path(fp32_path)
    session = open_session(fp32_path)
    meta = graph_metadata(session)
    enc_in = session.get_inputs()[0]
    runtime = ExportedSamPredictor(
        input_size=int(enc_in.shape[-1]),
        pixel_mean=tuple(meta.get("pixel_mean", PIXEL_MEAN)),
        pixel_std=tuple(meta.get("pixel_std", PIXEL_STD)),
        preprocessing=str(meta.get("preprocessing", "sam")),
    )
    del session
    inputs = [runtime.preprocess(item.image) for item in images]
    with tempfile.TemporaryDirectory(prefix="evsam-quantize-") as tmp, atomic_path(out_path) as staged:
        # onnxruntime's basic graph optimisations first (constant folding, shape inference): the
        # exporter emits shared conv biases as Identity nodes, and a bias that is not an
        # initializer keeps its Conv out of QLinearConv (it would run as DQ -> float Conv -> Q).
        prepared = Path(tmp) / "encoder.prepared.onnx"
        try:
            quantization.quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        except Exception as exc:  # onnxruntime raises plain RuntimeError/ValueError subclasses
            raise ExportError(f"preparing {fp32_path} for quantization failed: {exc}") from None
        proto = onnx.load(str(prepared))
        exclude, op_types = float_nodes(proto, keep_float)
        del proto
        try:
            quantization.quantize_static(
                str(prepared),
                str(staged),
                _calibration_reader(quantization, inputs, enc_in.name),
                quant_format=quantization.QuantFormat.QDQ,
                activation_type=quantization.QuantType.QUInt8,
                weight_type=quantization.QuantType.QInt8,
                per_channel=per_channel,
                calibrate_method=methods[calibration_method],
                nodes_to_exclude=exclude,
                op_types_to_quantize=op_types,
                extra_options={"CalibTensorRangeSymmetric": False, "CalibMovingAverage": False},
                calibration_providers=["CPUExecutionProvider"],
            )
        except Exception as exc:  # onnxruntime raises plain RuntimeError/ValueError subclasses
            raise ExportError(f"int8 quantization of {fp32_path} failed: {exc}") from None
        quantized = onnx.load(str(staged))
        counts = {
            "quantize_linear": sum(n.op_type == "QuantizeLinear" for n in quantized.graph.node),
            "dequantize_linear": sum(n.op_type == "DequantizeLinear" for n in quantized.graph.node),
        }
    return {
        "scheme": "QDQ, int8 weights (symmetric), uint8 activations (asymmetric)",
        "per_channel": per_channel,
        "calibration_method": calibration_method,
        "keep_float": list(keep_float),
        "op_types_quantized": op_types,
        "nodes_kept_float": len(exclude),
        "calibration_images": [item.name for item in images],
        **counts,
    }

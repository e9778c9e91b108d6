"""``export_model``: the whole ``evsam export`` as one keyword-only function.

ONNX export -> parity with PyTorch under onnxruntime -> (``dtype="int8"``) static quantization
of the encoder and its agreement with PyTorch -> (``trt``) TensorRT engines -> parity of the
engines -> ``export.json``. Every file is written atomically; ``export.json`` is written
even when a parity check fails (with ``"ok": false``) so that the numbers can be inspected.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import __version__
from ..utils.io import write_json_atomic
from .errors import ExportError
from .parity import Tolerance
from .runtimes import BuildJob, runtime_for_format

PRECISIONS = ("fp32", "fp16", "bf16")
DTYPES = ("fp32", "int8")  # of the exported ONNX encoder (int8: onnxruntime's quantization)


def _versions() -> dict[str, str | None]:
    import onnx
    import torch

    out: dict[str, str | None] = {
        "evsam": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
    }
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        out["onnxruntime"] = None
    try:
        import tensorrt

        out["tensorrt"] = tensorrt.__version__
    except ImportError:
        out["tensorrt"] = None
    return out


def preflight(*, fmt: str, precision: str, dtype: str = "fp32") -> None:
    """The checks that need no model: a registered format, a precision it builds, an encoder
    dtype it runs, its runtime (and device) present."""
    runtime = runtime_for_format(fmt)
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if dtype == "int8" and fmt != "onnx":
        raise ExportError("int8 is an onnxruntime quantization of encoder.onnx: use --format onnx")
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    runtime.check(precision=precision)


def export_model(
    *,
    model: str,
    output_dir: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str] | None = None,
    fmt: str = "onnx",
    precision: str = "fp32",
    input_size: int | None = None,
    opset: int | None = None,
    exporter: str = "auto",
    max_batch: int = 16,
    max_prompts: int = 64,
    max_points: int = 16,
    opt_prompts: int | None = None,
    workspace_gb: float = 4.0,
    tolerance: Tolerance | None = None,
    check: bool = True,
    dtype: str = "fp32",
    calibration: str | os.PathLike[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Export ``model`` to ``output_dir``; returns what is written to ``export.json``.

    Args:
      model / checkpoint / input_size: as ``create_model`` (random weights without checkpoint).
      fmt: a registered format (``export.runtimes``): "onnx" (encoder.onnx, decoder.onnx) or
        "trt" (also encoder.engine, decoder.engine).
      precision: TensorRT precision ("fp32", "fp16", "bf16"); ONNX graphs are always float32.
      opset / exporter: ONNX opset (default: 20 for "onnx", where GELU is one op for
        onnxruntime; 17 for "trt", what TensorRT 10's parser covers) and exporter ("auto",
        "torchscript", "dynamo").
      max_batch / max_prompts / max_points: TensorRT optimization-profile maxima (the encoder's
        kernels are tuned for max_batch, the decoder's for ``opt_prompts``, default min(16, max)).
      tolerance: allowed onnxruntime-vs-PyTorch difference (``Tolerance``).
      check: measure parity (off only for throwaway exports, e.g. inside ``evsam bench``).
      dtype: "fp32", or "int8": ``encoder.onnx`` statically quantized (QDQ, ``quantize.py``)
        beside the float32 ``decoder.onnx``, with an ``"agreement"`` object in export.json
        (always measured: it is the only accuracy figure an int8 export has).
      calibration: folder of calibration images for int8 (default: evsam's generated photos).
      progress: called with a short description before each step.
    Raises:
      ExportError when a graph cannot be produced or parity is outside tolerance;
      MissingDependencyError / DeviceError for ``trt`` without TensorRT or a GPU.
    """
    preflight(fmt=fmt, precision=precision, dtype=dtype)
    if calibration is not None and dtype != "int8":
        raise ExportError("--calibration applies to --dtype int8 only")

    from ..models import create_model
    from ..models.sam import PIXEL_MEAN, PIXEL_STD
    from .onnx import export_onnx
    from .parity import measure_parity

    step = progress or (lambda _msg: None)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    step(f"building {model}")
    try:
        net = create_model(model, checkpoint=checkpoint, device="cpu", input_size=input_size)
    except ValueError as exc:  # an input size the model cannot take
        raise ExportError(str(exc)) from None
    step("exporting ONNX graphs")
    if opset is None:
        opset = runtime_for_format(fmt).default_opset()
    onnx_export = export_onnx(net, out, opset=opset, exporter=exporter)
    record: dict[str, Any] = {
        "model": net.name,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "format": fmt,
        "precision": precision,
        "dtype": "float32",  # I/O dtype of every graph and engine
        "encoder_dtype": "float32",  # weights of encoder.onnx ("int8" when quantized)
        "input_size": net.input_size,
        "prompt_size": net.prompt_size,
        "preprocessing": net.preprocessing,
        "pixel_mean": list(PIXEL_MEAN),
        "pixel_std": list(PIXEL_STD),
        "opset": onnx_export.opset,
        "exporter": onnx_export.exporter,
        "versions": _versions(),
        "files": {
            "encoder": onnx_export.encoder_path.name,
            "decoder": onnx_export.decoder_path.name,
            **{f"{name.split('.')[0]}_weights": name for name in onnx_export.files if name.endswith(".data")},
        },
        "shapes": onnx_export.shapes,
        "decoder_outputs": "low_res_masks[:, 0] is the single-mask output, [:, 1:4] the multimask outputs",
        "onnx": {"mask_batch": onnx_export.mask_batch, "fp32_nodes": onnx_export.fp32_nodes},
        "parity": {},
        "ok": True,
    }
    failure: ExportError | None = None
    if check:
        step("checking onnxruntime against PyTorch")
        try:
            record["parity"]["onnxruntime"] = measure_parity(net, onnx_export, tolerance=tolerance)
        except ExportError as exc:
            failure = exc
            record["parity"]["onnxruntime"] = getattr(exc, "parity", {})
    if failure is None and dtype == "int8":
        failure = _quantize(net, onnx_export, record, calibration=calibration, step=step)
    if failure is None:
        settings = dict(
            max_batch=max_batch,
            max_prompts=max_prompts,
            max_points=max_points,
            opt_prompts=opt_prompts,
            workspace_gb=workspace_gb,
        )
        job = BuildJob(net, out, record, onnx_export, precision, settings, check, step)
        failure = runtime_for_format(fmt).build(job)
    record["ok"] = failure is None
    if failure is not None:
        record["error"] = str(failure)
    write_json_atomic(out / "export.json", record)
    if failure is not None:
        raise failure
    return record


def _quantize(
    net: Any,
    onnx_export: Any,
    record: dict[str, Any],
    *,
    calibration: str | os.PathLike[str] | None,
    step: Callable[[str], None],
) -> ExportError | None:
    """Replace encoder.onnx by its int8 quantization and record how it agrees with PyTorch."""
    from ..predictor.sam_predictor import SamPredictor
    from .agreement import measure_agreement
    from .quantize import calibration_images, quantize_encoder
    from .runtime import OnnxSamPredictor

    images = calibration_images(calibration)
    step(f"quantizing the encoder to int8 ({len(images)} calibration images)")
    try:
        record["quantization"] = quantize_encoder(
            onnx_export.encoder_path, onnx_export.encoder_path, images=images
        )
    except ExportError as exc:
        return exc
    record["encoder_dtype"] = "int8"
    step("measuring the int8 encoder's agreement with PyTorch")
    record["agreement"] = measure_agreement(
        SamPredictor(net), OnnxSamPredictor(onnx_export.encoder_path, onnx_export.decoder_path)
    )
    return None

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

FORMATS = ("onnx", "trt")
PRECISIONS = ("fp32", "fp16", "bf16")
DTYPES = ("fp32", "int8")  # weights of the exported ONNX encoder
# TensorRT runs TF32 for fp32 by default and fp16 with fp32 islands: looser than onnxruntime's fp32.
TRT_TOLERANCE = {
    "fp32": Tolerance(atol=1e-2, rtol=1e-2),
    "fp16": Tolerance(0.1, 0.1),
    "bf16": Tolerance(0.1, 0.1),
}


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
    """The checks that need no model (format, precision, dtype, TensorRT and a GPU for ``trt``)."""
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if dtype == "int8" and fmt != "onnx":
        raise ExportError("int8 is an onnxruntime quantization of encoder.onnx: use --format onnx")
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if fmt == "onnx" and precision != "fp32":
        raise ExportError(
            "ONNX graphs are exported in float32; --fp16 applies to --format trt, where TensorRT builds "
            "fp16 kernels and keeps the normalisation layers in float32"
        )
    if fmt == "trt":  # fail before the slow steps
        from .tensorrt import import_tensorrt, require_cuda

        require_cuda()
        import_tensorrt()


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
      fmt: "onnx" (encoder.onnx, decoder.onnx) or "trt" (also encoder.engine, decoder.engine).
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
    from .onnx import DEFAULT_OPSET, ONNXRUNTIME_OPSET, export_onnx
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
        opset = ONNXRUNTIME_OPSET if fmt == "onnx" else DEFAULT_OPSET
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
    if failure is None and fmt == "trt":
        failure = _export_trt(
            net,
            out,
            record,
            onnx_export,
            precision=precision,
            max_batch=max_batch,
            max_prompts=max_prompts,
            max_points=max_points,
            opt_prompts=opt_prompts,
            workspace_gb=workspace_gb,
            check=check,
            step=step,
        )
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


def _export_trt(
    net: Any,
    out: Path,
    record: dict[str, Any],
    onnx_export: Any,
    *,
    precision: str,
    max_batch: int,
    max_prompts: int,
    max_points: int,
    opt_prompts: int | None,
    workspace_gb: float,
    check: bool,
    step: Callable[[str], None],
) -> ExportError | None:
    from .tensorrt import build_engine, decoder_profile, encoder_profile

    profiles = {
        "encoder": encoder_profile(input_size=net.input_size, max_batch=max_batch),
        "decoder": decoder_profile(
            max_prompts=max_prompts,
            max_points=max_points,
            opt_prompts=opt_prompts,
            mask_batch=onnx_export.mask_batch,
        ),
    }
    fp32_layers = {}
    for part, onnx_path in (("encoder", onnx_export.encoder_path), ("decoder", onnx_export.decoder_path)):
        step(f"building the TensorRT {part} engine ({precision})")
        built = build_engine(
            onnx_path,
            out / f"{part}.engine",
            profile=profiles[part],
            precision=precision,
            workspace_gb=workspace_gb,
        )
        fp32_layers[part] = built.fp32_layers
        record["files"][f"{part}_engine"] = built.path.name
    record["tensorrt"] = {
        "profiles": {part: {k: [list(s) for s in v] for k, v in p.items()} for part, p in profiles.items()},
        "fp32_layers": fp32_layers,
        "max_batch": max_batch,
        "max_prompts": max_prompts,
        "max_points": max_points,
    }
    if not check:
        return None
    step("checking TensorRT against PyTorch")
    try:
        record["parity"]["tensorrt"] = measure_engine_parity(net, out, tolerance=TRT_TOLERANCE[precision])
    except ExportError as exc:
        record["parity"]["tensorrt"] = getattr(exc, "parity", {})
        return exc
    return None


def measure_engine_parity(net: Any, out: Path, *, tolerance: Tolerance) -> dict[str, Any]:
    """TrtSamPredictor vs SamPredictor on the synthetic image (embeddings, logits, IoU)."""
    import numpy as np

    from ..predictor.sam_predictor import SamPredictor
    from .parity import ParityRecorder, synthetic_image
    from .tensorrt import TrtSamPredictor

    image = synthetic_image()
    ref = SamPredictor(net)
    ours = TrtSamPredictor(out / "encoder.engine", out / "decoder.engine")
    ref.set_image(image)
    ours.set_image(image)
    h, w = image.shape[:2]
    boxes = np.array([[0.1 * w, 0.1 * h, 0.5 * w, 0.6 * h], [0.4 * w, 0.3 * h, 0.95 * w, 0.9 * h]])
    pairs = [("embeddings", ours.get_image_embedding(), ref.get_image_embedding().cpu().numpy())]
    _, ref_scores, ref_low = ref.predict_batch(boxes=boxes)
    _, scores, low = ours.predict_batch(boxes=boxes)
    pairs += [("logits", low, ref_low), ("iou", scores, ref_scores)]
    rec = ParityRecorder(tolerance)
    for name, a, b in pairs:
        rec.check("image", name, a, b)
    rec.raise_on_failure("TensorRT engines")
    return {**rec.groups, "tolerance": {"atol": tolerance.atol, "rtol": tolerance.rtol}}

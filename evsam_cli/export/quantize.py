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
* ``"attention"``: softmax attention (TinyViT, SAM's ViT): the Softmax and the MatMuls whose two
  inputs are both activations (``Q K^T``, ``attn V``). Their operands have no fixed range to
  calibrate and the softmax is exponential in its input.
* ``"resize"``: MatMuls against a constant interpolation matrix (weights summing to 1 along the
  contracted axis): the neck's bicubic resizes. Quantizing them added quantize/dequantize pairs
  for no accuracy or speed gain. (A transformer's linear layers are MatMuls too, and quantized.)
* ``"sensitive"``: the producers and readers of the activations that
  ``sensitivity.sensitive_tensors`` finds on the calibration images: those whose per-tensor
  rounding noise, carried through the next weighted layers, comes out too large against the
  signal (small channels next to huge ones that a folded BatchNorm then amplifies, as in
  TinyViT's MBConv blocks). Measured per model, so an architecture without such channels keeps
  everything quantized.
* ``"elementwise"``: only Conv and MatMul are quantized; the residual Adds (and any elementwise op
  between two quantized tensors) run in float between a DequantizeLinear and the next
  QuantizeLinear. With GELU as uint8 ops (below) this cost no measurable speed and lowered the
  embedding error on both EfficientViT and TinyViT.

Weights are quantized per output channel: BatchNorm folding gives every channel its own scale.
Activations are uint8 with weights int8 (u8s8), the pair onnxruntime's x86 kernels run on VNNI
and AMX.

GELU between two quantized tensors would run as dequantize -> float GELU -> quantize: three passes
over the largest tensors of the encoder in float32, memory-bound, as slow as all its convolutions.
``gelu_lookups`` replaces each by two uint8 ops, ``x * sigmoid(slope * x)`` with the sigmoid a
256-entry table (onnxruntime's ``QLinearSigmoid`` and ``QLinearMul``); the slope is fitted per
GELU to its quantization scales, and a GELU the fit does not reproduce within
``GELU_LOOKUP_MAX_RMS`` output steps stays in float.

The default calibration set, when no folder is given, is ``DEFAULT_CALIBRATION`` of evsam's own
generated photographs (``data/synthetic.py``: textured backgrounds and objects): always
available and reproducible; a few of the user's own images calibrate better.
"""

from __future__ import annotations

import math
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
from .sensitivity import DEFAULT_DEPTH, DEFAULT_THRESHOLD_DB, activation_stats, sensitive_tensors

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_CALIBRATION = 8  # generated photographs when no folder is given
MAX_CALIBRATION = 64  # images read from a folder (sorted by name)
KEEP_FLOAT_CHOICES = ("normalisation", "attention", "resize", "sensitive", "elementwise")
DEFAULT_KEEP_FLOAT = KEEP_FLOAT_CHOICES
QUICK_GELU_SLOPE = 1.702  # GELU(x) ~ x * sigmoid(1.702 x)
GELU_LOOKUP_SLOPES = np.linspace(1.5, 1.8, 31)  # searched per GELU by fit_gelu_lookup
GELU_LOOKUP_MAX_RMS = 1.0  # output steps; a GELU fitting worse stays dequantize -> float -> quantize


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


def _interpolation_matmuls(model_proto: Any) -> set[str]:
    """Names of the MatMuls against a constant interpolation matrix (the neck's resizes): every
    output a weighted average of its inputs, the weights along the contracted axis summing to 1.
    A linear layer's weights do not; the layout of the activation cannot tell them apart (TinyViT
    runs its MLPs on (B, H, W, C) maps, the resizes act on (N, C, H, W) ones)."""
    from onnx import numpy_helper

    constants = {i.name: i for i in model_proto.graph.initializer}
    found = set()
    for node in model_proto.graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2:
            continue
        for position, name in enumerate(node.input):
            if name not in constants or len(constants[name].dims) != 2:
                continue
            weights = numpy_helper.to_array(constants[name]).astype(np.float64)
            sums = weights.sum(axis=1 if position == 0 else 0)  # over the contracted axis
            if np.allclose(sums, 1.0, atol=1e-3):
                found.add(node.name)
    return found


def float_nodes(
    model_proto: Any, keep_float: Sequence[str], sensitive: Sequence[str] = ()
) -> tuple[list[str], list[str]]:
    """(nodes to exclude from quantization, op types to quantize) for ``keep_float``;
    ``sensitive`` names the activations ``sensitivity.sensitive_tensors`` found (used when
    "sensitive" is kept float)."""
    unknown = sorted(set(keep_float) - set(KEEP_FLOAT_CHOICES))
    if unknown:
        raise ExportError(f"unknown keep-float groups {unknown}: use any of {', '.join(KEEP_FLOAT_CHOICES)}")
    constants = {i.name for i in model_proto.graph.initializer} | {
        o for n in model_proto.graph.node if n.op_type == "Constant" for o in n.output
    }
    resizes = _interpolation_matmuls(model_proto) if "resize" in keep_float else set()
    weak = set(sensitive) if "sensitive" in keep_float else set()
    exclude = []
    for node in model_proto.graph.node:
        const_inputs = [i in constants for i in node.input]
        matmul = node.op_type == "MatMul"
        if (
            ("normalisation" in keep_float and node.name.startswith(FP32_TAG))
            or (
                "attention" in keep_float
                and (node.op_type == "Softmax" or (matmul and not any(const_inputs)))
            )
            or node.name in resizes
            or any(t in weak for t in (*node.input, *node.output))
        ):
            exclude.append(node.name)
    if "elementwise" in keep_float:
        op_types = ["Conv", "MatMul"]
    else:
        op_types = ["Conv", "MatMul", "Add", "Mul", "Gelu", "Relu", "Concat", "Div", "Transpose", "Reshape"]
    return exclude, op_types


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def fit_gelu_lookup(x_scale: float, x_zero: int, y_scale: float, y_zero: int) -> tuple[float, float, float]:
    """(slope, sigmoid scale, RMS error in output steps) of the uint8 GELU ``gelu_lookups`` builds
    between an input quantized with (``x_scale``, ``x_zero``) and an output with (``y_scale``,
    ``y_zero``): the sigmoid slope (near 1.702) that best reproduces the quantized float GELU over
    the 256 input levels, and the sigmoid's output scale (its range over those levels)."""
    x = x_scale * (np.arange(256) - x_zero)
    exact = np.clip(np.round(_gelu(x) / y_scale) + y_zero, 0, 255)
    best = (math.inf, QUICK_GELU_SLOPE, 1 / 255)
    for slope in GELU_LOOKUP_SLOPES:
        sig = 1 / (1 + np.exp(-slope * x))
        sig_scale = float(sig.max()) / 255
        sig = np.clip(np.round(sig / sig_scale), 0, 255) * sig_scale
        approx = np.clip(np.round(x * sig / y_scale) + y_zero, 0, 255)
        err = float(np.mean((approx - exact) ** 2))
        if err < best[0]:
            best = (err, float(slope), sig_scale)
    return best[1], best[2], math.sqrt(best[0])


def gelu_lookups(model_proto: Any, max_rms_steps: float = GELU_LOOKUP_MAX_RMS) -> int:
    """Replace each ``DequantizeLinear -> Gelu -> QuantizeLinear`` of a QDQ graph by uint8 ops,
    ``QLinearMul(x, QLinearSigmoid(slope * x))`` (onnxruntime's com.microsoft ops; the sigmoid
    is a 256-entry table), where ``fit_gelu_lookup`` reproduces the quantized GELU within
    ``max_rms_steps`` output steps. Returns how many were replaced; edits ``model_proto``."""
    from onnx import helper, numpy_helper

    graph = model_proto.graph
    scalars = {i.name: numpy_helper.to_array(i) for i in graph.initializer if not i.dims}
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    replace: dict[int, list[Any]] = {}
    drop: set[int] = set()
    for n in graph.node:
        dq = producer.get(n.input[0]) if n.op_type == "Gelu" else None
        after = readers.get(n.output[0], []) if dq is not None else []
        if dq is None or dq.op_type != "DequantizeLinear" or len(after) != 1:
            continue
        q = after[0]
        if q.op_type != "QuantizeLinear" or len(dq.input) < 3 or len(q.input) < 3:
            continue
        x, x_scale, x_zero = dq.input[:3]
        if not all(k in scalars for k in (x_scale, x_zero, *q.input[1:3])):
            continue
        if scalars[x_zero].dtype != np.uint8 or scalars[q.input[2]].dtype != np.uint8:
            continue
        slope, sig_scale, rms = fit_gelu_lookup(
            float(scalars[x_scale]),
            int(scalars[x_zero]),
            float(scalars[q.input[1]]),
            int(scalars[q.input[2]]),
        )
        if rms > max_rms_steps:
            continue
        base = n.name or n.output[0]
        sig = (f"{base}/sigmoid", f"{base}/sigmoid_scale", f"{base}/sigmoid_zero")
        graph.initializer.extend(
            [
                numpy_helper.from_array(
                    np.asarray(scalars[x_scale] * slope, np.float32), f"{base}/sigmoid_in"
                ),
                numpy_helper.from_array(np.asarray(sig_scale, np.float32), sig[1]),
                numpy_helper.from_array(np.asarray(0, np.uint8), sig[2]),
            ]
        )
        replace[id(n)] = [
            helper.make_node(
                "QLinearSigmoid",
                [x, f"{base}/sigmoid_in", x_zero, sig[1], sig[2]],
                [sig[0]],
                name=f"{base}/QLinearSigmoid",
                domain="com.microsoft",
            ),
            helper.make_node(
                "QLinearMul",
                [x, x_scale, x_zero, *sig, q.input[1], q.input[2]],
                [q.output[0]],
                name=f"{base}/QLinearMul",
                domain="com.microsoft",
            ),
        ]
        drop.add(id(q))
        if len(readers[dq.output[0]]) == 1:
            drop.add(id(dq))
    if not replace:
        return 0
    nodes = [m for n in graph.node for m in replace.get(id(n), [] if id(n) in drop else [n])]
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model_proto.opset_import):
        model_proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(replace)


def quantize_encoder(
    fp32_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    images: Sequence[CalibrationImage],
    per_channel: bool = True,
    keep_float: Sequence[str] = DEFAULT_KEEP_FLOAT,
    calibration_method: str = "minmax",
    gelu_lookup: bool = True,
    sensitivity_db: float = DEFAULT_THRESHOLD_DB,
    sensitivity_depth: int = DEFAULT_DEPTH,
) -> dict[str, Any]:
    """Write a statically quantized (QDQ, int8 weights, uint8 activations) copy of the exported
    encoder ``fp32_path`` to ``out_path`` (atomically; the two may be the same file).

    Args:
      images: calibration images (``calibration_images``), preprocessed as the runtime does.
      per_channel: one weight scale per output channel (else one per tensor).
      keep_float: node groups left in float (``KEEP_FLOAT_CHOICES``).
      calibration_method: "minmax", "entropy" or "percentile" (onnxruntime's calibrators).
      gelu_lookup: run each GELU between quantized tensors as uint8 ops (``gelu_lookups``)
        instead of dequantize -> float GELU -> quantize.
      sensitivity_db, sensitivity_depth: the "sensitive" group's threshold and depth
        (``sensitivity.sensitive_tensors``).
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
        sensitive: dict[str, float] = {}
        if "sensitive" in keep_float:
            stats = activation_stats(prepared, inputs, enc_in.name)
            sensitive = sensitive_tensors(proto, stats, threshold_db=sensitivity_db, depth=sensitivity_depth)
            del stats
        exclude, op_types = float_nodes(proto, keep_float, list(sensitive))
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
        lookups = gelu_lookups(quantized) if gelu_lookup else 0
        if lookups:
            onnx.save(quantized, str(staged))
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
        "sensitive_tensors": len(sensitive),
        "sensitivity": {"threshold_db": sensitivity_db, "depth": sensitivity_depth},
        "gelu_lookups": lookups,
        "calibration_images": [item.name for item in images],
        **counts,
    }

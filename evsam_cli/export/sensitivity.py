"""Which activations of an encoder graph lose too much to one per-tensor uint8 scale.

onnxruntime quantizes activations per tensor: one scale for all channels. Where one channel
spans a hundred times the range of the others, the small channels keep a handful of levels.
That alone is harmless when the next layers weigh those channels as little as their size, and
fatal when they amplify them: TinyViT's MBConv blocks (LiteMedSAM, MobileSAM) fold BatchNorms
with large gains into their depthwise convolutions, so the rounding noise of a small channel comes
out of the next layers as large as the signal.

``sensitive_tensors`` measures this on the calibration images instead of guessing it from the
architecture. For every float activation it takes the rounding noise of a uint8 scale spanning
the tensor's calibrated range (``step**2 / 12`` per element), carries it through the following
weighted layers (convolutions and matmuls with constant weights; activations, residual adds and
layout ops pass it through unchanged) for up to ``depth`` of them, and compares it, channel by
channel, with the float signal measured at each of those layers. The median over channels is the
tensor's signal-to-noise ratio in dB; below ``threshold_db`` the tensor is sensitive and
``quantize.py`` keeps the nodes that produce and read it in float. The threshold and depth were
chosen by measurement (docs/precision.md).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_THRESHOLD_DB = 15.0
DEFAULT_DEPTH = 3  # weighted layers the noise is carried through
# Ops that pass noise through unchanged (to first order: GELU's slope is within [-0.2, 1.2]).
_PASS_OPS = frozenset({"Gelu", "Relu", "Identity", "Pad", "Transpose", "Reshape", "Add", "Slice"})
_EXTERNAL_DATA_BYTES = 1 << 30  # above this, the augmented copy is saved with external data


@dataclass
class ChannelStats:
    """Calibration statistics of one activation: per channel (axis 1 of 4-D tensors, the last
    axis otherwise) min, max and mean square."""

    low: np.ndarray
    high: np.ndarray
    mean_square: np.ndarray

    @property
    def step(self) -> float:
        """The uint8 step of an asymmetric per-tensor scale over the calibrated range."""
        return float(max(self.high.max(), 0.0) - min(self.low.min(), 0.0)) / 255


def _channels_last(x: np.ndarray) -> np.ndarray:
    if x.ndim == 4:
        x = np.moveaxis(x, 1, -1)
    return x.reshape(-1, x.shape[-1]) if x.ndim >= 1 else x.reshape(1, 1)


def _constants(proto: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    out = {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            out[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return out


def activation_stats(
    model_path: str | os.PathLike[str], inputs: Sequence[np.ndarray], input_name: str
) -> dict[str, ChannelStats]:
    """``ChannelStats`` of every float activation of the graph at ``model_path`` over ``inputs``."""
    import onnx

    from .runtime import open_session

    proto = onnx.shape_inference.infer_shapes(onnx.load(str(model_path)))
    constants = set(_constants(proto))
    values = list(proto.graph.value_info) + list(proto.graph.output)
    names = [
        v.name
        for v in values
        if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT and v.name not in constants
    ]
    del proto.graph.output[:]
    proto.graph.output.extend(
        onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names
    )
    stats: dict[str, ChannelStats] = {}
    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="evsam-sensitivity-") as tmp:
        path = Path(tmp) / "augmented.onnx"
        onnx.save(proto, str(path), save_as_external_data=proto.ByteSize() > _EXTERNAL_DATA_BYTES)
        del proto
        session = open_session(path)
        for x in inputs:
            outputs = session.run(names, {input_name: x})
            for name, value in zip([input_name, *names], [x, *outputs], strict=True):
                a = _channels_last(np.asarray(value, dtype=np.float32))
                low, high = a.min(0), a.max(0)
                ms = np.square(a, dtype=np.float64).mean(0)
                if name in stats:
                    s = stats[name]
                    if s.low.shape != low.shape:  # a tensor whose channel count varies: skip it
                        continue
                    s.low, s.high = np.minimum(s.low, low), np.maximum(s.high, high)
                    s.mean_square = s.mean_square + ms
                    counts[name] += 1
                else:
                    stats[name], counts[name] = ChannelStats(low, high, ms), 1
        del session
    for name, s in stats.items():
        s.mean_square = s.mean_square / counts[name]
    return stats


def _weighted_noise(node: Any, tensor: str, noise: np.ndarray, constants: dict[str, np.ndarray]) -> Any:
    """Per-output-channel noise power of ``node`` (a conv or matmul with constant weights reading
    ``tensor``) for per-input-channel noise power ``noise``; None for any other node."""
    if len(node.input) < 2 or node.input[0] != tensor or node.input[1] not in constants:
        return None
    w2 = np.square(constants[node.input[1]].astype(np.float64))
    if node.op_type == "Conv" and w2.ndim >= 3:
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        out_ch, in_per_group = w2.shape[:2]
        if noise.shape[0] != in_per_group * groups or out_ch % groups:
            return None
        w2 = w2.reshape(groups, out_ch // groups, in_per_group, -1).sum(-1)
        return np.einsum("goc,gc->go", w2, noise.reshape(groups, in_per_group)).reshape(-1)
    if node.op_type in ("MatMul", "Gemm") and w2.ndim == 2:
        if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
            w2 = w2.T
        return noise @ w2 if w2.shape[0] == noise.shape[0] else None
    return None


def tensor_sqnr(proto: Any, stats: dict[str, ChannelStats], depth: int = DEFAULT_DEPTH) -> dict[str, float]:
    """Signal-to-noise ratio (dB) of each activation of ``stats`` quantized per tensor: the lowest
    of its own median channel ratio and that of each weighted layer within ``depth``."""
    constants = _constants(proto)
    consumers: dict[str, list[Any]] = {}
    for node in proto.graph.node:
        for name in set(node.input):
            consumers.setdefault(name, []).append(node)

    def median_db(signal: np.ndarray, noise: np.ndarray) -> float:
        return float(np.median(10 * np.log10(np.maximum(signal, 1e-30) / np.maximum(noise, 1e-30))))

    def walk(tensor: str, noise: np.ndarray, hops: int, seen: set[str], out: list[float]) -> None:
        for node in consumers.get(tensor, []):
            y = node.output[0] if node.output else ""
            if y in seen or y not in stats:
                continue
            if node.op_type in _PASS_OPS:
                if stats[y].mean_square.shape == noise.shape:
                    seen.add(y)
                    walk(y, noise, hops, seen, out)
                continue
            carried = _weighted_noise(node, tensor, noise, constants)
            if carried is None or carried.shape != stats[y].mean_square.shape:
                continue
            seen.add(y)
            out.append(median_db(stats[y].mean_square, carried))
            if hops > 1:
                walk(y, carried, hops - 1, seen, out)

    sqnr = {}
    for name, s in stats.items():
        noise_power = s.step**2 / 12
        if noise_power == 0:
            continue
        noise = np.full(s.mean_square.shape, noise_power)
        found = [median_db(s.mean_square, noise)]
        walk(name, noise, depth, {name}, found)
        sqnr[name] = min(found)
    return sqnr


def sensitive_tensors(
    proto: Any,
    stats: dict[str, ChannelStats],
    *,
    threshold_db: float = DEFAULT_THRESHOLD_DB,
    depth: int = DEFAULT_DEPTH,
) -> dict[str, float]:
    """The activations whose ``tensor_sqnr`` is below ``threshold_db``, with their SQNR."""
    return {k: v for k, v in tensor_sqnr(proto, stats, depth).items() if v < threshold_db}

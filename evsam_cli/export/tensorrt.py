"""TensorRT 10 engines from the exported ONNX graphs, and ``TrtSamPredictor`` to run them.

Building needs ``tensorrt`` (``pip install 'evsam[trt]'``) and an NVIDIA GPU; the pure-python
parts (optimization-profile shapes, binding plans) are plain functions usable and tested
anywhere. Engines are built with one optimization profile: the encoder batch ranges over
1..max_batch, the decoder's prompt count over 1..max_prompts and its points per prompt over
1..max_points. With ``fp16`` the nodes that ``export_onnx`` tagged (LayerNorms, LiteMLA's
attention) are constrained to float32, where fp16 overflows.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DeviceError, MissingDependencyError
from ..utils.io import write_bytes_atomic
from .errors import ExportError
from .onnx import FP32_TAG
from .runtime import LOW_RES_SIZE, PIXEL_MEAN, PIXEL_STD, PROMPT_SIZE, ExportedSamPredictor

Shape = tuple[int, ...]
ProfileShapes = dict[str, tuple[Shape, Shape, Shape]]  # name -> (min, opt, max)


# ---------------------------------------------------------------------------- profiles (pure)
def encoder_profile(*, input_size: int, max_batch: int, opt_batch: int | None = None) -> ProfileShapes:
    """Shapes of ``images`` for batches 1..max_batch (opt: ``opt_batch``, default max_batch)."""
    if max_batch < 1:
        raise ExportError(f"max batch must be at least 1, got {max_batch}")
    opt = max_batch if opt_batch is None else opt_batch
    if not 1 <= opt <= max_batch:
        raise ExportError(f"opt batch {opt} is outside 1..{max_batch}")
    shape = (3, input_size, input_size)
    return {"images": ((1, *shape), (opt, *shape), (max_batch, *shape))}


def decoder_profile(
    *,
    max_prompts: int,
    max_points: int = 16,
    opt_prompts: int | None = None,
    opt_points: int = 2,
    mask_batch: str = "broadcast",
) -> ProfileShapes:
    """Shapes of the decoder inputs for N in 1..max_prompts and K in 1..max_points.

    ``opt_prompts`` defaults to min(16, max_prompts) and ``opt_points`` to 2 (one box), the
    shapes of box-prompted evaluation. The mask input is 1 row at opt (no mask, broadcast)
    unless the graph ties its batch to the prompts (``mask_batch="prompts"``).
    """
    if max_prompts < 1 or max_points < 1:
        raise ExportError(f"max prompts and max points must be at least 1, got {max_prompts}, {max_points}")
    n_opt = min(16, max_prompts) if opt_prompts is None else opt_prompts
    k_opt = min(opt_points, max_points)
    if not 1 <= n_opt <= max_prompts:
        raise ExportError(f"opt prompts {n_opt} is outside 1..{max_prompts}")
    m_opt = 1 if mask_batch == "broadcast" else n_opt
    low = (1, LOW_RES_SIZE, LOW_RES_SIZE)
    return {
        "image_embeddings": ((1, 256, 64, 64),) * 3,  # type: ignore[dict-item]
        "point_coords": ((1, 1, 2), (n_opt, k_opt, 2), (max_prompts, max_points, 2)),
        "point_labels": ((1, 1), (n_opt, k_opt), (max_prompts, max_points)),
        "mask_input": ((1, *low), (m_opt, *low), (max_prompts, *low)),
        "has_mask_input": ((1,), (m_opt,), (max_prompts,)),
    }


# ---------------------------------------------------------------------------- binding plans (pure)
@dataclass(frozen=True)
class TensorSpec:
    """One engine I/O tensor: name, direction, dtype name (TensorRT's) and shape (-1 dynamic)."""

    name: str
    is_input: bool
    dtype: str
    shape: Shape
    profile: tuple[Shape, Shape, Shape] | None = None  # (min, opt, max) for inputs


@dataclass(frozen=True)
class BindingPlan:
    """Input shapes to set and output names to allocate, validated against the engine."""

    inputs: tuple[tuple[str, Shape, str], ...]  # (name, shape, dtype name)
    outputs: tuple[tuple[str, str], ...]  # (name, dtype name)


def plan_bindings(
    specs: Sequence[TensorSpec], shapes: Mapping[str, Shape], *, engine: str = "engine"
) -> BindingPlan:
    """Check ``shapes`` (input name -> shape) against the engine's I/O and profile ranges.

    Raises ``ExportError`` naming the tensor for a missing or unexpected input, a wrong rank, a
    static dimension that differs, or a dimension outside the optimization profile (with the
    flag to rebuild with).
    """
    inputs = [s for s in specs if s.is_input]
    names = {s.name for s in inputs}
    missing = sorted(names - set(shapes))
    unexpected = sorted(set(shapes) - names)
    if missing or unexpected:
        raise ExportError(
            f"{engine}: inputs do not match the engine (missing {missing}, unexpected {unexpected})"
        )
    planned = []
    for spec in inputs:
        shape = tuple(int(d) for d in shapes[spec.name])
        if len(shape) != len(spec.shape):
            raise ExportError(
                f"{engine}: input {spec.name} has rank {len(shape)}, the engine expects {spec.shape}"
            )
        for axis, (got, want) in enumerate(zip(shape, spec.shape, strict=True)):
            if want != -1 and got != want:
                raise ExportError(
                    f"{engine}: input {spec.name} dim {axis} is {got}, the engine fixes it at {want}"
                )
        if spec.profile is not None:
            lo, _, hi = spec.profile
            for axis, (got, a, b) in enumerate(zip(shape, lo, hi, strict=True)):
                if not a <= got <= b:
                    raise ExportError(
                        f"{engine}: input {spec.name} dim {axis} is {got}, outside the engine's profile {a}..{b}; "
                        "rebuild with a larger --max-batch / --max-prompts / --max-points"
                    )
        planned.append((spec.name, shape, spec.dtype))
    outputs = tuple((s.name, s.dtype) for s in specs if not s.is_input)
    return BindingPlan(inputs=tuple(planned), outputs=outputs)


# ---------------------------------------------------------------------------- TensorRT access
def import_tensorrt() -> Any:
    """``tensorrt`` itself, or ``MissingDependencyError`` naming the ``trt`` extra."""
    try:
        import tensorrt
    except ImportError:
        raise MissingDependencyError("tensorrt", "trt", "TensorRT export and inference") from None
    return tensorrt


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise DeviceError(
            "TensorRT needs an NVIDIA GPU, and no CUDA device is available (use --engine onnxruntime)"
        )


def _logger(trt: Any) -> Any:
    return trt.Logger(trt.Logger.WARNING)


def mark_fp32_layers(network: Any, trt: Any, tag: str = FP32_TAG) -> int:
    """Constrain the layers parsed from tagged ONNX nodes to float32; returns how many."""
    count = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if tag not in layer.name:
            continue
        float_outputs = [j for j in range(layer.num_outputs) if layer.get_output(j).dtype == trt.float32]
        if not float_outputs or layer.type in (trt.LayerType.SHAPE, trt.LayerType.CONSTANT):
            continue
        layer.precision = trt.float32
        for j in float_outputs:
            layer.set_output_type(j, trt.float32)
        count += 1
    return count


@dataclass
class EngineBuild:
    path: Path
    fp32_layers: int
    profile: ProfileShapes


def build_engine(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    *,
    profile: ProfileShapes,
    precision: str = "fp32",
    workspace_gb: float = 4.0,
) -> EngineBuild:
    """Parse ``onnx_path``, build a serialized engine for ``profile`` and write it atomically.

    ``precision``: "fp32", "fp16" or "bf16" (the last two keep tagged layers in float32).
    """
    trt = import_tensorrt()
    require_cuda()
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(_parser_error(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    opt_profile = builder.create_optimization_profile()
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    if set(profile) != inputs:
        raise ExportError(
            f"profile names {sorted(profile)} do not match the inputs of {onnx_path}: {sorted(inputs)}"
        )
    for name, (lo, opt, hi) in profile.items():
        opt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    fp32_layers = 0
    if precision in ("fp16", "bf16"):
        config.set_flag(trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.BF16)
        fp32_layers = mark_fp32_layers(network, trt)
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
    elif precision != "fp32":
        raise ExportError(f"unknown precision {precision!r}: use fp32, fp16 or bf16")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    write_bytes_atomic(engine_path, bytes(serialized))
    return EngineBuild(path=Path(engine_path), fp32_layers=fp32_layers, profile=profile)


def _parser_error(err: Any) -> str:
    """One ONNX-parser error as text (IParserError: desc(), node name, code)."""
    desc = err.desc() if hasattr(err, "desc") else str(err)
    node = err.node_name() if hasattr(err, "node_name") else ""
    return f"{desc} (node {node})" if node else desc


class TrtRunner:
    """One deserialized engine with its execution context; runs on torch CUDA tensors."""

    def __init__(self, engine_path: str | os.PathLike[str]) -> None:
        trt = import_tensorrt()
        require_cuda()
        import torch

        path = Path(engine_path)
        if not path.is_file():
            raise ExportError(f"TensorRT engine not found: {path}")
        self._trt = trt
        self._torch = torch
        self.name = path.name
        self.runtime = trt.Runtime(_logger(trt))
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ExportError(f"cannot deserialize {path}: built by another TensorRT version or GPU?")
        self.context = self.engine.create_execution_context()
        self.specs = [self._spec(self.engine.get_tensor_name(i)) for i in range(self.engine.num_io_tensors)]

    def _spec(self, name: str) -> TensorSpec:
        engine, trt = self.engine, self._trt
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        dtype = str(engine.get_tensor_dtype(name)).rsplit(".", 1)[-1]
        profile = None
        if is_input:
            lo, opt, hi = engine.get_tensor_profile_shape(name, 0)
            profile = (tuple(lo), tuple(opt), tuple(hi))
        return TensorSpec(name, is_input, dtype, tuple(engine.get_tensor_shape(name)), profile)

    def input_spec(self, name: str) -> TensorSpec:
        for spec in self.specs:
            if spec.name == name and spec.is_input:
                return spec
        raise ExportError(f"{self.name} has no input {name!r}")

    def __call__(self, inputs: Mapping[str, Any], *, stream: Any = None) -> dict[str, Any]:
        """Inputs (torch tensors or numpy arrays) by name -> outputs as torch CUDA tensors.

        Work is queued on ``stream`` (default: torch's current stream); synchronise before
        reading the outputs on the host.
        """
        torch = self._torch
        plan = plan_bindings(self.specs, {k: tuple(v.shape) for k, v in inputs.items()}, engine=self.name)
        stream = stream or torch.cuda.current_stream()
        keep = []  # input tensors must outlive the asynchronous execution
        for name, shape, dtype in plan.inputs:
            tensor = torch.as_tensor(inputs[name], device="cuda").to(_torch_dtype(torch, dtype)).contiguous()
            keep.append(tensor)
            self.context.set_input_shape(name, shape)
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name, dtype in plan.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise ExportError(f"{self.name}: output {name} has unresolved shape {shape}")
            out = torch.empty(shape, dtype=_torch_dtype(torch, dtype), device="cuda")
            self.context.set_tensor_address(name, out.data_ptr())
            outputs[name] = out
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ExportError(f"{self.name}: TensorRT execution failed")
        # Keep the inputs referenced until the next call: the caching allocator only reuses their
        # memory for work queued after this execution on the same stream.
        self._keep = keep
        return outputs


def _torch_dtype(torch: Any, name: str) -> Any:
    table = {
        "FLOAT": torch.float32,
        "HALF": torch.float16,
        "BF16": torch.bfloat16,
        "INT32": torch.int32,
        "INT64": torch.int64,
        "INT8": torch.int8,
        "UINT8": torch.uint8,
        "BOOL": torch.bool,
    }
    if name not in table:
        raise ExportError(f"unsupported TensorRT tensor type {name}")
    return table[name]


class TrtSamPredictor(ExportedSamPredictor):
    """``SamPredictor``'s API over ``encoder.engine`` and ``decoder.engine`` (TensorRT 10).

    Pre/post-processing is the numpy code of ``OnnxSamPredictor``; the engines run on torch CUDA
    tensors. The encoder input size comes from the engine; prompt chunks follow the decoder's
    profile (at most its max prompts per call).
    """

    def __init__(
        self,
        encoder_path: str | os.PathLike[str],
        decoder_path: str | os.PathLike[str],
        *,
        mask_batch: str | None = None,
        max_prompts_per_pass: int = 256,
    ) -> None:
        self.encoder = TrtRunner(encoder_path)
        self.decoder = TrtRunner(decoder_path)
        images = self.encoder.input_spec("images")
        coords = self.decoder.input_spec("point_coords")
        max_prompts = coords.profile[2][0] if coords.profile else max_prompts_per_pass
        record = _export_json(Path(decoder_path))
        if mask_batch is None:
            mask_batch = record.get("onnx", {}).get("mask_batch", "broadcast")
        super().__init__(
            input_size=int(images.shape[-1]),
            prompt_size=int(record.get("prompt_size", PROMPT_SIZE)),
            preprocessing=str(record.get("preprocessing", "sam")),
            pixel_mean=PIXEL_MEAN,
            pixel_std=PIXEL_STD,
            mask_batch=str(mask_batch),
            max_prompts_per_pass=min(max_prompts_per_pass, int(max_prompts)),
        )

    def _encode(self, images: np.ndarray) -> np.ndarray:
        out = self.encoder({"images": images})
        return out["image_embeddings"].float().cpu().numpy()

    def _decode(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        out = self.decoder(inputs)
        return out["low_res_masks"].float().cpu().numpy(), out["iou_predictions"].float().cpu().numpy()


def _export_json(engine_path: Path) -> dict[str, Any]:
    """``export.json`` beside an engine, or {} when there is none."""
    import json

    candidate = engine_path.with_name("export.json")
    if candidate.is_file():
        return json.loads(candidate.read_text())
    return {}

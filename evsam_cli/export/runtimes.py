"""The runtimes that run exported models, registered once.

A runtime is one ``ExportRuntime`` subclass plus ``register_runtime``: its ``evsam export
--format`` name and its ``evsam bench --engine`` name, the precisions it builds, the checks that
need no model, the files it adds to an ONNX export (``build``), the predictor that runs them
(``predictor``) and the engine ``evsam bench`` times (``bench_engine``). The export pipeline,
``evsam export`` and ``evsam bench`` read their choices from ``RUNTIMES``.

Nothing heavy is imported here: every method imports its runtime on first use, so that
``--help`` and the torch-free ``OnnxSamPredictor`` stay light.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from .errors import ExportError

if TYPE_CHECKING:
    from ..throughput.engines import Engine
    from .runtime import ExportedSamPredictor

Step = Callable[[str], None]


@dataclass(frozen=True)
class BuildJob:
    """What ``export_model`` hands a runtime's ``build`` once the ONNX graphs are written."""

    net: Any  # the exported Sam
    out: Path  # the export folder
    record: dict[str, Any]  # what export.json will hold: ``build`` adds its files and parity
    onnx_export: Any  # export.onnx.OnnxExport: the graphs and their settings
    precision: str
    settings: dict[str, Any]  # export_model's settings for runtimes that build (max_batch ...)
    check: bool  # measure parity with PyTorch
    step: Step  # progress: called with a short description before each step


class ExportRuntime:
    """One runtime for exported models. Subclasses set the class attributes and the methods."""

    name: ClassVar[str]  # ``evsam bench --engine`` name
    format: ClassVar[str]  # ``evsam export --format`` name
    suffix: ClassVar[str]  # encoder/decoder file suffix in an export folder
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)
    needs_cuda: ClassVar[bool] = False
    description: ClassVar[str] = ""

    def check(self, *, precision: str = "fp32", device_type: str | None = None) -> None:
        """Raise an ``EvsamError`` for a setting this runtime cannot run (before slow steps).

        ``device_type`` ("cpu"/"cuda") is given by ``evsam bench``; ``evsam export`` leaves it
        None (the export runs where this runtime needs it)."""
        if precision not in self.precisions:
            raise ExportError(self.precision_message(precision))

    def default_opset(self) -> int:
        """The ONNX opset exported for this runtime when none is asked for."""
        from .onnx import DEFAULT_OPSET

        return DEFAULT_OPSET

    def precision_message(self, precision: str) -> str:
        return f"{self.name} runs {', '.join(self.precisions)}, not {precision}"

    def build(self, job: BuildJob) -> ExportError | None:
        """Add this runtime's files to the ONNX export in ``job.out`` (and their parity to
        ``job.record``).

        Returns the parity failure, if any (``export.json`` is written with it before raising)."""
        return None

    def files(self, folder: Path) -> tuple[Path, Path]:
        """The encoder and decoder files in an export folder, or an ``ExportError`` naming what lacks."""
        encoder, decoder = folder / f"encoder{self.suffix}", folder / f"decoder{self.suffix}"
        missing = [str(p) for p in (encoder, decoder) if not p.is_file()]
        if missing:
            raise ExportError(
                f"exported files not found: {', '.join(missing)} (write them with `evsam export`)"
            )
        return encoder, decoder

    def predictor(self, folder: str | Path, **kwargs: Any) -> ExportedSamPredictor:
        """``SamPredictor``'s API over the files of an export folder."""
        raise NotImplementedError

    def bench_engine(self, folder: Path, *, device: Any, batch_size: int, prompts: int) -> Engine:
        """The engine ``evsam bench`` times on the files of an export folder."""
        raise NotImplementedError


RUNTIMES: dict[str, ExportRuntime] = {}

R = TypeVar("R", bound=type[ExportRuntime])


def register_runtime(cls: R) -> R:
    """Class decorator: make ``cls`` an ``evsam export --format`` and ``evsam bench --engine``."""
    runtime = cls()
    clash = [r.name for r in RUNTIMES.values() if runtime.format == r.format and r.name != runtime.name]
    if clash:
        raise ValueError(f"format {runtime.format!r} is already exported by {clash[0]}")
    RUNTIMES[runtime.name] = runtime
    return cls


def runtime_names() -> tuple[str, ...]:
    """Registered ``evsam bench --engine`` names of exported runtimes."""
    return tuple(RUNTIMES)


def export_formats() -> tuple[str, ...]:
    """Registered ``evsam export --format`` names."""
    return tuple(r.format for r in RUNTIMES.values())


def get_runtime(name: str) -> ExportRuntime:
    """The runtime with engine name ``name``, or an ``ExportError`` listing the registered ones."""
    try:
        return RUNTIMES[name]
    except KeyError:
        raise ExportError(f"unknown runtime {name!r}: use one of {', '.join(RUNTIMES)}") from None


def runtime_for_format(fmt: str) -> ExportRuntime:
    """The runtime that ``evsam export --format fmt`` builds for."""
    for runtime in RUNTIMES.values():
        if runtime.format == fmt:
            return runtime
    raise ExportError(f"unknown format {fmt!r}: use one of {', '.join(export_formats())}")


@register_runtime
class OnnxRuntime(ExportRuntime):
    """onnxruntime on ``encoder.onnx`` / ``decoder.onnx`` (float32 graphs, CPU or onnxruntime-gpu)."""

    name = "onnxruntime"
    format = "onnx"
    suffix = ".onnx"
    description = "ONNX graphs run by onnxruntime"

    def default_opset(self) -> int:
        from .onnx import ONNXRUNTIME_OPSET  # GELU as one op

        return ONNXRUNTIME_OPSET

    def precision_message(self, precision: str) -> str:
        return (
            f"onnxruntime runs the float32 graphs of an ONNX export; {precision} applies to TensorRT, "
            "which builds reduced-precision kernels and keeps the normalisation layers in float32"
        )

    def predictor(self, folder: str | Path, **kwargs: Any) -> ExportedSamPredictor:
        from .runtime import OnnxSamPredictor

        return OnnxSamPredictor(*self.files(Path(folder)), **kwargs)

    def bench_engine(self, folder: Path, *, device: Any, batch_size: int, prompts: int) -> Engine:
        from ..throughput.engines import OnnxRuntimeEngine

        encoder, decoder = self.files(folder)
        return OnnxRuntimeEngine(encoder, decoder, device=device.type, batch_size=batch_size, prompts=prompts)


@register_runtime
class TensorRT(ExportRuntime):
    """TensorRT 10 engines built from the ONNX graphs (NVIDIA GPU, ``pip install 'evsam[trt]'``)."""

    name = "trt"
    format = "trt"
    suffix = ".engine"
    precisions = ("fp32", "fp16", "bf16")
    needs_cuda = True
    description = "ONNX graphs plus TensorRT engines"

    def check(self, *, precision: str = "fp32", device_type: str | None = None) -> None:
        from ..errors import DeviceError
        from .tensorrt import import_tensorrt, require_cuda

        super().check(precision=precision, device_type=device_type)
        if device_type is not None and device_type != "cuda":
            raise DeviceError("engine trt needs an NVIDIA GPU (device cuda); none is in use here").naming(
                "engine", "device"
            )
        require_cuda()
        import_tensorrt()

    def build(self, job: BuildJob) -> ExportError | None:
        from .tensorrt import export_engines

        return export_engines(
            job.net,
            job.out,
            job.record,
            job.onnx_export,
            precision=job.precision,
            check=job.check,
            step=job.step,
            **job.settings,
        )

    def predictor(self, folder: str | Path, **kwargs: Any) -> ExportedSamPredictor:
        from .tensorrt import TrtSamPredictor

        return TrtSamPredictor(*self.files(Path(folder)), **kwargs)

    def bench_engine(self, folder: Path, *, device: Any, batch_size: int, prompts: int) -> Engine:
        from ..throughput.engines import TensorRTEngine
        from .tensorrt import _export_json

        encoder, decoder = self.files(folder)
        mask_batch = _export_json(decoder).get("onnx", {}).get("mask_batch", "broadcast")
        return TensorRTEngine(encoder, decoder, batch_size=batch_size, prompts=prompts, mask_batch=mask_batch)

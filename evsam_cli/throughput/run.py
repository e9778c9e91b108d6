"""``run_bench``: one model on one engine -> DESIGN.md's bench record; ``bench_zoo`` for many."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .engines import BenchError, make_engine
from .names import DTYPES, engine_names
from .reference import GPUS, device_matches, known_gpus, reference_for
from .timing import measure

# (warmup, iters) by device: a CPU call of L0 takes a second or more, a GPU call milliseconds.
DEFAULT_REPEATS = {"cpu": (1, 5), "cuda": (5, 20)}


def default_repeats(device_type: str) -> tuple[int, int]:
    return DEFAULT_REPEATS.get(device_type, DEFAULT_REPEATS["cpu"])


def default_dtype(engine: str, device_type: str) -> str:
    """fp16 for TensorRT on a GPU (the paper's setting), fp32 everywhere else."""
    return "fp16" if engine == "trt" and device_type == "cuda" else "fp32"


def preflight(
    *,
    engine: str,
    device: str,
    dtype: str | None,
    batch_size: int,
    prompts: int,
    warmup: int | None,
    iters: int | None,
    gpu: str | None,
) -> tuple[Any, str, int, int]:
    """Every check that needs no model: (torch device, dtype, warmup, iters) or an ``EvsamError``."""
    from ..utils.devices import resolve_device

    dev = resolve_device(device)
    dtype = dtype or default_dtype(engine, dev.type)
    default_warmup, default_iters = default_repeats(dev.type)
    warmup = default_warmup if warmup is None else warmup
    iters = default_iters if iters is None else iters
    if engine not in engine_names():
        raise BenchError(f"unknown engine {engine!r}: use one of {', '.join(engine_names())}")
    if dtype not in DTYPES:
        raise BenchError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if dtype == "int8" and engine != "onnxruntime":
        raise BenchError("int8 is an onnxruntime quantization of the encoder: use engine onnxruntime").naming(
            "engine"
        )
    if engine == "onnxruntime" and dtype not in ("fp32", "int8"):
        raise BenchError("onnxruntime runs float32 graphs or an int8 encoder: use dtype fp32 or int8").naming(
            "dtype"
        )
    if engine in ("torch", "compile") and dtype == "fp16" and dev.type == "cpu":
        raise BenchError(
            "fp16 on the CPU has no fast kernels in PyTorch (minutes per image): use --dtype bf16 or fp32"
        )
    for name, value, low in (("batch size", batch_size, 1), ("prompts", prompts, 1), ("iters", iters, 1)):
        if value < low:
            raise BenchError(f"{name} must be at least {low}, got {value}")
    if warmup < 1:
        raise BenchError(f"warmup must be at least 1 (the first call is never timed), got {warmup}")
    if engine in ("torch", "compile") and dtype != "fp32":
        from ..accel.precision import check_dtype

        check_dtype(dtype, dev)  # bf16 without bf16 instructions
    if gpu is not None and gpu.lower() not in GPUS:
        raise BenchError(f"no paper figures for --gpu {gpu!r}: known GPUs are {', '.join(known_gpus())}")
    from ..export.runtimes import RUNTIMES

    if engine in RUNTIMES:  # its precision, package and device, before a model is built
        from ..export.errors import ExportError

        try:
            RUNTIMES[engine].check(precision=dtype, device_type=dev.type)
        except ExportError as exc:
            raise BenchError(str(exc)) from None
    return dev, dtype, warmup, iters


def run_bench(
    *,
    model: str,
    engine: str = "torch",
    checkpoint: str | os.PathLike[str] | None = None,
    device: str = "auto",
    dtype: str | None = None,
    batch_size: int = 1,
    prompts: int = 16,
    warmup: int | None = None,
    iters: int | None = None,
    gpu: str | None = None,
    exported: str | os.PathLike[str] | None = None,
    input_size: int | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Time encoder, decoder and end to end; returns (record, warnings).

    Args:
      model / checkpoint / input_size: as ``create_model`` (random weights without checkpoint:
        speed does not depend on the values).
      engine: torch, compile (torch.compile) or a registered export runtime
        (``export.runtimes``: onnxruntime, trt).
      device: cpu, cuda[:i] or auto; dtype: fp32, fp16, bf16, int8 (onnxruntime; default: fp16
        for trt, else fp32). Reduced precisions add an ``"agreement"`` with fp32 PyTorch to the
        record (``export/agreement.py``).
      batch_size: images per encoder call; prompts: box prompts per decoder call (P).
      warmup / iters: untimed calls (at least 1) and timed calls per measurement; default
        1 and 5 on the CPU, 5 and 20 on a GPU.
      gpu: a100 or orin: the paper's figure for that GPU goes into ``reference``.
      exported: a folder from ``evsam export`` (onnxruntime: *.onnx, trt: *.engine); default:
        export to a temporary folder.
      progress: called as ``progress(phase, steps_done_in_phase)``.
    Returns:
      the bench record (DESIGN.md's JSON) and human-readable warnings.
    """
    from ..models import create_model
    from ..utils.devices import device_name

    dev, dtype, warmup, iters = preflight(
        engine=engine,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        prompts=prompts,
        warmup=warmup,
        iters=iters,
        gpu=gpu,
    )
    warnings: list[str] = []
    name = device_name(dev)
    if gpu is not None:
        setting = GPUS[gpu.lower()]
        if not device_matches(setting.name, name):
            warnings.append(
                f"the paper's figures are for {setting.description}; this run is on {name}, so they are not comparable"
            )
        if (engine, dtype, batch_size) != (setting.engine, setting.dtype, setting.batch_size):
            warnings.append(
                f"the paper measured {setting.engine} {setting.dtype} at batch {setting.batch_size}; "
                f"this run is {engine} {dtype} at batch {batch_size}"
            )

    from ..models import get_spec

    if input_size is not None and get_spec(model).family != "efficientvit-sam":
        warnings.append(
            f"--input-size applies to EfficientViT-SAM only; {get_spec(model).name} runs at its own size"
        )
        input_size = None
    try:
        net = create_model(model, checkpoint=checkpoint, device="cpu", input_size=input_size)
    except ValueError as exc:  # an input size the model cannot take
        raise BenchError(str(exc)) from None
    report = progress or (lambda _phase, _done: None)
    report("preparing " + engine, 0)
    eng = make_engine(
        engine,
        model=net,
        checkpoint=checkpoint,
        device=dev,
        dtype=dtype,
        batch_size=batch_size,
        prompts=prompts,
        exported=None if exported is None else Path(exported),
        progress=lambda msg: report(msg, 0),
    )
    try:
        timings = {}
        for phase, fn in (("encoder", eng.encode), ("decoder", eng.decode), ("end_to_end", eng.end_to_end)):
            done = [0]

            def step(phase: str = phase, done: list[int] = done) -> None:
                done[0] += 1
                report(phase, done[0])

            report(phase, 0)
            timings[phase] = measure(fn, warmup=warmup, iters=iters, cuda=eng.cuda, on_step=step)
        agreement = _agreement(net, dtype, eng) if dtype != "fp32" and engine != "trt" else None
    finally:
        eng.close()
    record = {
        "model": net.name,
        "engine": engine,
        "device": dev.type,
        "device_name": name,
        "dtype": dtype,
        "batch_size": batch_size,
        "image_size": int(net.input_size),
        "encoder": {
            "images_per_s": timings["encoder"].per_second(batch_size),
            "latency_ms": timings["encoder"].latency_ms(),
        },
        "decoder": {
            "prompts": prompts,
            "prompts_per_s": timings["decoder"].per_second(prompts),
            "latency_ms": timings["decoder"].latency_ms(),
        },
        "end_to_end": {"images_per_s": timings["end_to_end"].per_second(batch_size)},
        "reference": None if gpu is None else reference_for(net.name, gpu),
    }
    if agreement is not None:
        record["agreement"] = agreement
    if gpu is not None and record["reference"] is None:
        warnings.append(f"the paper gives no {gpu} figure for {net.name}")
    return record, warnings


def _agreement(net: Any, dtype: str, eng: Any) -> dict[str, Any]:
    """How the benched precision agrees with fp32 PyTorch (``measure_agreement``)."""
    from ..export.agreement import measure_agreement
    from ..predictor.sam_predictor import SamPredictor

    reference = SamPredictor(net)
    if dtype == "int8":
        import json

        from ..export.runtime import OnnxSamPredictor

        record = eng.encoder_path.parent / "export.json"  # the int8 export measured it already
        if record.is_file() and "agreement" in (known := json.loads(record.read_text())):
            return known["agreement"]
        return measure_agreement(reference, OnnxSamPredictor(eng.encoder_path, eng.decoder_path))
    return measure_agreement(reference, SamPredictor(net, dtype=dtype))


def bench_zoo(
    *,
    models: Sequence[str],
    on_model: Callable[[str], None] | None = None,
    **kwargs: Any,
) -> tuple[list[dict[str, Any]], list[str]]:
    """``run_bench`` for each of ``models`` with the same settings; (records, warnings)."""
    records: list[dict[str, Any]] = []
    warnings: list[str] = []
    for name in models:
        if on_model:
            on_model(name)
        record, warns = run_bench(model=name, **kwargs)
        records.append(record)
        warnings.extend(w for w in warns if w not in warnings)
    return records, warnings

"""`evsam export`: ONNX graphs (and TensorRT engines) with their measured parity."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ..export.runtimes import RUNTIMES, export_formats
from .common import command, console, progress_task

# one format per registered export runtime (``export.runtimes``)
Format = Enum("Format", {fmt: fmt for fmt in export_formats()}, type=str)  # type: ignore[misc]


class Exporter(str, Enum):
    auto = "auto"
    torchscript = "torchscript"
    dynamo = "dynamo"


class ExportDtype(str, Enum):
    fp32 = "fp32"
    int8 = "int8"


@command
def export_cli(
    model: Annotated[str, typer.Option(help="Model name or alias (see `evsam models`).")] = ...,  # type: ignore[assignment]
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the exported files.")] = ...,  # type: ignore[assignment]
    checkpoint: Annotated[
        Path | None, typer.Option(help="Weights to load (official or evsam file); random weights if omitted.")
    ] = None,
    fmt: Annotated[
        Format,
        typer.Option(
            "--format",
            help="; ".join(f"{r.format}: {r.description}" for r in RUNTIMES.values()) + ".",
        ),
    ] = Format.onnx,  # type: ignore[attr-defined]
    fp16: Annotated[
        bool, typer.Option("--fp16", help="TensorRT fp16 engines (normalisation kept in fp32).")
    ] = False,
    bf16: Annotated[bool, typer.Option("--bf16", help="TensorRT bf16 engines.")] = False,
    dtype: Annotated[
        ExportDtype,
        typer.Option(help="int8: encoder.onnx statically quantized (QDQ) beside the fp32 decoder.onnx."),
    ] = ExportDtype.fp32,
    calibration: Annotated[
        Path | None,
        typer.Option(help="--dtype int8: folder of calibration images. Default: evsam's generated photos."),
    ] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="TensorRT: largest encoder batch.")] = 16,
    max_prompts: Annotated[
        int, typer.Option(min=1, help="TensorRT: largest number of prompts per decoder call.")
    ] = 64,
    max_points: Annotated[
        int, typer.Option(min=1, help="TensorRT: largest number of points per prompt.")
    ] = 16,
    workspace_gb: Annotated[float, typer.Option(help="TensorRT builder workspace (GiB).")] = 4.0,
    opset: Annotated[
        int | None,
        typer.Option(help="ONNX opset. Default: 20 for onnx (GELU as one op), 17 for trt (TensorRT 10)."),
    ] = None,
    exporter: Annotated[Exporter, typer.Option(help="PyTorch ONNX exporter.")] = Exporter.auto,
    input_size: Annotated[
        int | None, typer.Option(help="Encoder input side (EfficientViT-SAM only, multiple of 32).")
    ] = None,
    atol: Annotated[float, typer.Option(help="Parity tolerance, absolute.")] = 1e-3,
    rtol: Annotated[
        float, typer.Option(help="Parity tolerance, relative to the largest reference value.")
    ] = 1e-3,
) -> None:
    """Export a model to ONNX (and TensorRT) and measure the difference to PyTorch.

    Writes encoder.onnx, decoder.onnx (dynamic batch, prompt and point counts) and export.json
    (versions, opset, shapes, measured max differences); with --format trt also encoder.engine
    and decoder.engine. The export fails if onnxruntime differs from PyTorch beyond tolerance.

    Examples:

      [bold]evsam export --model l0 --checkpoint efficientvit_sam_l0.pt --format onnx -o export/l0[/bold]

      [bold]evsam export --model xl1 --checkpoint efficientvit_sam_xl1.pt --format trt --fp16 -o export/xl1[/bold]

      [bold]evsam export --model l0 --checkpoint efficientvit_sam_l0.pt --dtype int8 --calibration photos/ -o export/l0-int8[/bold]
    """
    from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from ..export.parity import Tolerance
    from ..export.pipeline import export_model
    from .common import error

    if fp16 and bf16:
        error("--fp16 and --bf16 exclude each other")
        raise typer.Exit(1)
    precision = "fp16" if fp16 else "bf16" if bf16 else "fp32"
    from ..export.runtimes import runtime_for_format

    if precision not in runtime_for_format(fmt.value).precisions:
        takes = [f"--format {r.format}" for r in RUNTIMES.values() if precision in r.precisions]
        error(f"--{precision} applies to {' or '.join(takes)}; {fmt.value} files are float32")
        raise typer.Exit(1)
    from ..export.pipeline import preflight
    from ..models import resolve_name

    resolve_name(model)
    preflight(
        fmt=fmt.value, precision=precision, dtype=dtype.value
    )  # fail before the progress display starts
    if calibration is not None and dtype is not ExportDtype.int8:
        error("--calibration applies to --dtype int8 only")
        raise typer.Exit(1)
    with progress_task(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()) as (bar, task):
        record = export_model(
            model=model,
            output_dir=output,
            checkpoint=checkpoint,
            fmt=fmt.value,
            precision=precision,
            input_size=input_size,
            opset=opset,
            exporter=exporter.value,
            max_batch=max_batch,
            max_prompts=max_prompts,
            max_points=max_points,
            workspace_gb=workspace_gb,
            tolerance=Tolerance(atol=atol, rtol=rtol),
            dtype=dtype.value,
            calibration=calibration,
            progress=lambda msg: bar.update(task, description=msg),
        )

    table = Table(title=f"evsam export: {record['model']} -> {output}")
    for col in ("file", "size (MB)", "inputs", "outputs"):
        table.add_column(col)
    for part in ("encoder", "decoder"):
        io = record["shapes"][part]
        fmt_io = lambda d: ", ".join(f"{k} {tuple(v)}" for k, v in d.items())  # noqa: E731
        for key in (part, f"{part}_weights", f"{part}_engine"):
            name = record["files"].get(key)
            if name:
                size = (output / name).stat().st_size / 1e6
                table.add_row(name, f"{size:.1f}", fmt_io(io["inputs"]), fmt_io(io["outputs"]))
    console.print(table)

    parity = Table(title="max |exported - PyTorch|")
    for col in ("runtime", "inputs", "embeddings", "logits", "iou"):
        parity.add_column(col, justify="right" if col not in ("runtime", "inputs") else "left")
    for runtime, groups in record["parity"].items():
        for group in ("random", "image"):
            if group in groups:
                d = groups[group]
                parity.add_row(
                    runtime,
                    group,
                    *(f"{d.get(k, float('nan')):.2e}" for k in ("embeddings", "logits", "iou")),
                )
    if record["parity"]:
        console.print(parity)
    if "agreement" in record:
        a = record["agreement"]
        console.print(
            f"int8 encoder vs PyTorch fp32 on {len(a['images'])} images, {a['boxes']} boxes: embedding "
            f"relative L2 {a['embedding_rel_l2']['mean']:.4f} (max {a['embedding_rel_l2']['max']:.4f}), "
            f"box-mask IoU mean {a['mask_iou']['mean']:.4f}, min {a['mask_iou']['min']:.4f}"
        )
    console.print(
        f"opset {record['opset']} ({record['exporter']} exporter), precision {record['precision']}; "
        f"details in [bold]{output / 'export.json'}[/bold]"
    )

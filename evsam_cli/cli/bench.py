"""`evsam bench`: throughput and latency of a model on an engine, beside the paper's figures."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from ..throughput.names import engine_names
from .common import command, console, err_console, progress_task

# torch, compile and every registered export runtime (``export.runtimes``)
EngineName = Enum("EngineName", {name: name for name in engine_names()}, type=str)  # type: ignore[misc]


class DType(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"
    int8 = "int8"


@command
def bench_cli(
    model: Annotated[
        str, typer.Option(help="Model name or alias (see `evsam models`).")
    ] = "efficientvit-sam-l0",
    engine: Annotated[
        EngineName,
        typer.Option(help="What runs the model: the model in PyTorch, or an exported runtime."),
    ] = EngineName.torch,  # type: ignore[attr-defined]
    checkpoint: Annotated[
        Path | None, typer.Option(help="Weights to load; random weights if omitted.")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "auto",
    dtype: Annotated[
        DType | None,
        typer.Option(
            help="Precision (default: fp16 for trt on a GPU, fp32 otherwise); int8 with --engine onnxruntime."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per encoder call.")] = 1,
    prompts: Annotated[int, typer.Option(min=1, help="Box prompts per image for the decoder.")] = 16,
    warmup: Annotated[
        int | None,
        typer.Option(
            min=1, help="Untimed calls first; the first call is never timed (default: 1 CPU, 5 GPU)."
        ),
    ] = None,
    iters: Annotated[
        int | None, typer.Option(min=1, help="Timed calls per measurement (default: 5 CPU, 20 GPU).")
    ] = None,
    gpu: Annotated[
        str | None,
        typer.Option(help="Put the paper's figures for this GPU beside the measured ones: a100, orin."),
    ] = None,
    exported: Annotated[
        Path | None, typer.Option(help="Folder from `evsam export` (default: export to a temporary folder).")
    ] = None,
    input_size: Annotated[
        int | None, typer.Option(help="Encoder input side (EfficientViT-SAM only, multiple of 32).")
    ] = None,
    all_models: Annotated[
        bool, typer.Option("--all", help="Benchmark the zoo (or --models) into one table.")
    ] = False,
    models: Annotated[
        str | None, typer.Option(help="Comma-separated models for --all (default: every zoo model).")
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a throughput-vs-accuracy PNG here.")] = None,
    metrics: Annotated[
        list[Path] | None,
        typer.Option(
            help="`evsam eval` metrics.json for the plot's accuracy axis (repeatable; default: paper mAP)."
        ),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here.")] = None,
) -> None:
    """Measure encoder images/s, decoder prompts/s and end-to-end images/s.

    Timing starts after the warm-up calls; on CUDA with events and synchronisation. Random
    weights are used without --checkpoint (speed does not depend on them).

    Examples:

      [bold]evsam bench --model l0 --engine torch --iters 5[/bold]

      [bold]evsam bench --model l0 --engine onnxruntime --prompts 64 --json bench.json[/bold]

      [bold]evsam bench --model l0 --engine trt --gpu a100 --batch-size 16[/bold]

      [bold]evsam bench --all --engine trt --gpu a100 --batch-size 16 --plot zoo.png[/bold]
    """
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from ..models import list_models, resolve_name
    from ..throughput import bench_zoo, plot_throughput, read_metrics, run_bench
    from ..utils.io import write_json_atomic

    settings: dict[str, Any] = dict(
        engine=engine.value,
        checkpoint=checkpoint,
        device=device,
        dtype=None if dtype is None else dtype.value,
        batch_size=batch_size,
        prompts=prompts,
        warmup=warmup,
        iters=iters,
        gpu=gpu,
        exported=exported,
        input_size=input_size,
    )
    user_metrics = read_metrics(metrics) if metrics else None
    if models and not all_models:
        raise typer.BadParameter("--models goes with --all")
    names = [resolve_name(m.strip()) for m in models.split(",") if m.strip()] if models else list_models()
    if all_models and len(names) > 1 and (exported is not None or checkpoint is not None):
        raise typer.BadParameter(
            "--exported and --checkpoint hold one model's files; with --all use --models NAME"
        )

    from ..throughput.run import preflight

    _, _, warmup, iters = preflight(
        engine=engine.value,
        device=device,
        dtype=settings["dtype"],
        batch_size=batch_size,
        prompts=prompts,
        warmup=warmup,
        iters=iters,
        gpu=gpu,
    )
    settings.update(warmup=warmup, iters=iters)
    if not all_models:
        resolve_name(model)
    steps = warmup + iters
    with progress_task(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        total=3 * steps,
        out=err_console,
    ) as (bar, task):
        current = {"model": model}

        def report(phase: str, done: int) -> None:
            offset = {"encoder": 0, "decoder": steps, "end_to_end": 2 * steps}.get(phase)
            label = f"{current['model']}: {phase}"
            bar.update(task, description=label, completed=0 if offset is None else offset + done)

        def on_model(name: str) -> None:
            current["model"] = name
            bar.reset(task)

        if all_models:
            records, warnings = bench_zoo(models=names, on_model=on_model, progress=report, **settings)
        else:
            record, warnings = run_bench(model=model, progress=report, **settings)
            records = [record]
    for message in warnings:
        err_console.print(f"[yellow]Warning:[/yellow] {message}", highlight=False)
    if all_models:
        _zoo_table(records)
        payload: dict[str, Any] = {"results": records}
    else:
        _single_table(records[0])
        payload = records[0]
    if plot is not None:
        plot_throughput(records, plot, metrics=user_metrics)
        console.print(f"plot: [bold]{plot}[/bold]")
    if json_out is not None:
        write_json_atomic(json_out, payload)
        console.print(f"results: [bold]{json_out}[/bold]")


def _single_table(rec: dict[str, Any]) -> None:
    from rich.table import Table

    ref = rec["reference"]
    title = (
        f"evsam bench: {rec['model']} | {rec['engine']} {rec['dtype']} | {rec['device_name']} | "
        f"input {rec['image_size']}px, batch {rec['batch_size']}"
    )
    table = Table(title=title)
    for col, justify in (
        ("stage", "left"),
        ("throughput", "right"),
        ("median ms", "right"),
        ("p90 ms", "right"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    if ref is not None:
        table.add_column(f"paper ({ref['gpu']})", justify="right")
    enc, dec = rec["encoder"], rec["decoder"]
    extra = [""] if ref is not None else []
    table.add_row(
        f"image encoder (batch {rec['batch_size']})",
        f"{enc['images_per_s']:.2f} images/s",
        f"{enc['latency_ms']['median']:.1f}",
        f"{enc['latency_ms']['p90']:.1f}",
        *extra,
    )
    table.add_row(
        f"prompt encoder + mask decoder ({dec['prompts']} boxes)",
        f"{dec['prompts_per_s']:.1f} prompts/s",
        f"{dec['latency_ms']['median']:.1f}",
        f"{dec['latency_ms']['p90']:.1f}",
        *extra,
    )
    paper = [f"{ref['images_per_s']:g} images/s"] if ref is not None else []
    table.add_row(
        f"end to end ({dec['prompts']} boxes per image)",
        f"{rec['end_to_end']['images_per_s']:.2f} images/s",
        f"{1000 * rec['batch_size'] / rec['end_to_end']['images_per_s']:.1f}",
        "",
        *paper,
    )
    console.print(table)
    if ref is not None:
        console.print(f"paper: {ref['source']}", highlight=False)
    if "agreement" in rec:
        a = rec["agreement"]
        console.print(
            f"{rec['dtype']} vs fp32 PyTorch ({len(a['images'])} images, {a['boxes']} boxes): embedding "
            f"relative L2 {a['embedding_rel_l2']['mean']:.4f}, box-mask IoU mean {a['mask_iou']['mean']:.4f}, "
            f"min {a['mask_iou']['min']:.4f}",
            highlight=False,
        )


def _zoo_table(records: list[dict[str, Any]]) -> None:
    from rich import box
    from rich.table import Table

    from ..models.profile import profile_model
    from ..throughput import paper_figures

    first = records[0]
    table = Table(
        box=box.SIMPLE_HEAD,
        title=f"evsam bench --all | {first['engine']} {first['dtype']} | {first['device_name']} | "
        f"batch {first['batch_size']}, {first['decoder']['prompts']} boxes per image",
    )
    # Short headers and names: the table must fit an 80-column terminal.
    cols = ("model", "params", "GMACs", "engine", "enc img/s", "enc ms", "e2e img/s")
    for col in cols:
        table.add_column(
            col, justify="left" if col in ("model", "engine") else "right", no_wrap=col == "model"
        )
    has_ref = any(r["reference"] for r in records)
    if has_ref:
        gpu = next(r["reference"]["gpu"] for r in records if r["reference"])
        table.add_column(f"paper img/s {gpu}", justify="right")
    table.add_column("paper mAP", justify="right")
    for rec in records:
        prof = profile_model(rec["model"])
        figures = paper_figures(rec["model"])
        row = [
            rec["model"].replace("efficientvit-sam-", "").upper()
            if "efficientvit" in rec["model"]
            else rec["model"],
            f"{prof.params / 1e6:.1f}",
            f"{prof.encoder_macs / 1e9:.1f}",
            rec["engine"],
            f"{rec['encoder']['images_per_s']:.2f}",
            f"{rec['encoder']['latency_ms']['median']:.0f}",
            f"{rec['end_to_end']['images_per_s']:.2f}",
        ]
        if has_ref:
            row.append(f"{rec['reference']['images_per_s']:g}" if rec["reference"] else "-")
        row.append(f"{figures.coco_map}" if figures and figures.coco_map is not None else "-")
        table.add_row(*row)
    console.print(table)
    console.print(
        "params in millions; GMACs of the image encoder at the model's own input size; "
        "paper mAP: COCO, ViTDet boxes as prompts; e2e: encoder + the boxes of each image."
    )

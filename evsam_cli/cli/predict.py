"""`evsam predict`: masks for an image from point and box prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..predictor.amg_settings import AmgSettings
from .common import CheckpointOption, DtypeOption, InferenceDtype, ModelOption, command, console, parse_floats


def _amg_option(name: str) -> Any:
    """A ``--everything`` option: help and default are ``AmgSettings``'s own."""
    default = AmgSettings.default(name)
    shown = f"{default:g}" if isinstance(default, float) else str(default)
    return typer.Option(
        help=f"{AmgSettings.help(name)}  [default: {shown}]",  # None here means "not given"
        show_default=False,
        rich_help_panel="Segment everything (--everything)",
    )


def _parse_point(text: str) -> tuple[float, float, int]:
    values = parse_floats(text, None, "--point")
    if len(values) not in (2, 3):
        raise typer.BadParameter(f"--point takes x,y or x,y,label; got {text!r}")
    label = int(values[2]) if len(values) == 3 else 1
    if label not in (0, 1):
        raise typer.BadParameter(f"a point label is 1 (foreground) or 0 (background); got {text!r}")
    return values[0], values[1], label


@command
def predict_cli(
    image: Annotated[
        Path, typer.Argument(help="Image file (JPEG, PNG, ...; grayscale/RGBA/16-bit are converted).")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for masks, overlay and scores.")],
    model: ModelOption = "l0",
    checkpoint: CheckpointOption = None,
    box: Annotated[
        list[str] | None, typer.Option("--box", help="x0,y0,x1,y1 in pixels; repeat for several objects.")
    ] = None,
    point: Annotated[
        list[str] | None,
        typer.Option("--point", help="x,y[,label] (label 1 fg, 0 bg); all points form one prompt."),
    ] = None,
    multimask: Annotated[
        bool | None,
        typer.Option(
            "--multimask/--single-mask",
            help="Three candidate masks per prompt (default: only for a lone point, as SAM advises).",
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1 ...")] = "cpu",
    dtype: DtypeOption = InferenceDtype.fp32,
    everything: Annotated[
        bool,
        typer.Option(
            "--everything", help="Segment everything: prompt a grid of points, no --box/--point needed."
        ),
    ] = False,
    points_per_side: Annotated[int | None, _amg_option("points_per_side")] = None,
    points_per_batch: Annotated[int | None, _amg_option("points_per_batch")] = None,
    pred_iou_thresh: Annotated[float | None, _amg_option("pred_iou_thresh")] = None,
    stability_score_thresh: Annotated[float | None, _amg_option("stability_score_thresh")] = None,
    box_nms_thresh: Annotated[float | None, _amg_option("box_nms_thresh")] = None,
    crop_n_layers: Annotated[int | None, _amg_option("crop_n_layers")] = None,
    min_mask_region_area: Annotated[int | None, _amg_option("min_mask_region_area")] = None,
) -> None:
    """Segment objects in IMAGE from box and/or point prompts, or everything in it.

    Writes [bold]mask_<i>.png[/bold] (best mask of each prompt), [bold]overlay.png[/bold] and
    [bold]scores.json[/bold] to --output. With [bold]--everything[/bold]: [bold]masks.json[/bold]
    (every mask as COCO RLE, SA-1B layout) and [bold]overlay.png[/bold].

    Examples:

      evsam predict photo.jpg --box 40,60,380,420 -o out/

      evsam predict photo.jpg --point 200,150 --point 260,40,0 -m xl1 --checkpoint efficientvit_sam_xl1.pt -o out/

      evsam predict photo.jpg --everything --checkpoint efficientvit_sam_l0.pt -o out/

      evsam predict photo.jpg --everything --points-per-side 16 --crop-n-layers 1 -o out/
    """
    everything_options = {
        "points_per_side": points_per_side,
        "points_per_batch": points_per_batch,
        "pred_iou_thresh": pred_iou_thresh,
        "stability_score_thresh": stability_score_thresh,
        "box_nms_thresh": box_nms_thresh,
        "crop_n_layers": crop_n_layers,
        "min_mask_region_area": min_mask_region_area,
    }
    # What both modes are given alike: the image, the output folder, the model and where it runs.
    run: dict[str, Any] = dict(
        image_path=image,
        output=output,
        model_name=model,
        checkpoint=checkpoint,
        device=device,
        dtype=dtype.value,
    )
    if everything:
        if box or point:
            raise typer.BadParameter("--everything prompts a point grid itself; drop --box/--point")
        _predict_everything(run, everything_options)
        return
    given = [k for k, v in everything_options.items() if v is not None]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise typer.BadParameter(f"{flag} applies to --everything only", param_hint=flag)

    from ..predictor.segment import predict_image

    boxes = [parse_floats(b, 4, "--box") for b in box or []]
    points = [_parse_point(p) for p in point or []]
    if not boxes and not points:
        raise typer.BadParameter("give at least one --box or --point", param_hint="--box/--point")
    if len(boxes) > 1 and points:
        raise typer.BadParameter(
            "points combine with at most one box (one prompt); several boxes are separate prompts"
        )
    result = predict_image(**run, boxes=boxes, points=points, multimask_output=multimask)

    from rich.table import Table

    table = Table(title=f"{result['model']} on {image.name}")
    for col in ("prompt", "best score", "scores", "area (px)", "mask"):
        table.add_column(col)
    for p in result["prompts"]:
        table.add_row(
            p["description"],
            f"{p['scores'][p['best']]:.3f}",
            ", ".join(f"{s:.3f}" for s in p["scores"]),
            str(p["area"]),
            p["mask"],
        )
    console.print(table)
    console.print(
        f"encoder {result['encoder_seconds']:.2f} s, decoder {result['decoder_seconds']:.2f} s -> {output}"
    )


def _predict_everything(run: dict[str, Any], options: dict[str, Any]) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from ..predictor.segment import predict_everything
    from .common import progress_task

    image, output = run["image_path"], run["output"]
    settings = {k: v for k, v in options.items() if v is not None}
    with progress_task(
        TextColumn("[bold]segment everything"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("points"),
        TimeElapsedColumn(),
    ) as (bar, task):
        result = predict_everything(
            **run, progress=lambda done, total: bar.update(task, completed=done, total=total), **settings
        )

    from rich.table import Table

    seconds = result["seconds"]
    table = Table(title=f"{result['model']} on {image.name}: segment everything")
    for col in ("masks", "mean predicted IoU", "mean stability", "encoder (s)", "decoder (s)", "total (s)"):
        table.add_column(col, justify="right")
    anns = result["annotations"]
    mean_iou = result["mean_predicted_iou"]
    table.add_row(
        str(result["num_masks"]),
        "-" if mean_iou is None else f"{mean_iou:.3f}",
        f"{sum(a['stability_score'] for a in anns) / len(anns):.3f}" if anns else "-",
        f"{seconds['encoder_s']:.2f}",
        f"{seconds['decoder_s'] + seconds['postprocess_s']:.2f}",
        f"{seconds['total']:.2f}",
    )
    console.print(table)
    console.print(f"masks.json and overlay.png -> {output}")

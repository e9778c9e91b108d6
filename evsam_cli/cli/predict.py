"""`evsam predict`: masks for an image from point and box prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import command, console, parse_floats


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
    image: Annotated[Path, typer.Argument(help="Image file (JPEG, PNG, ...; grayscale/RGBA/16-bit are converted).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for masks, overlay and scores.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model name or alias (see `evsam models`).")] = "l0",
    checkpoint: Annotated[
        str | None, typer.Option(help="Weights file, or 'hub' for the official release. Default: random weights.")
    ] = None,
    box: Annotated[
        list[str] | None, typer.Option("--box", help="x0,y0,x1,y1 in pixels; repeat for several objects.")
    ] = None,
    point: Annotated[
        list[str] | None, typer.Option("--point", help="x,y[,label] (label 1 fg, 0 bg); all points form one prompt.")
    ] = None,
    multimask: Annotated[
        bool | None,
        typer.Option(
            "--multimask/--single-mask",
            help="Three candidate masks per prompt (default: only for a lone point, as SAM advises).",
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1 ...")] = "cpu",
) -> None:
    """Segment objects in IMAGE from box and/or point prompts.

    Writes [bold]mask_<i>.png[/bold] (best mask of each prompt), [bold]overlay.png[/bold] and
    [bold]scores.json[/bold] to --output.

    Examples:

      evsam predict photo.jpg --box 40,60,380,420 -o out/

      evsam predict photo.jpg --point 200,150 --point 260,40,0 -m xl1 --checkpoint efficientvit_sam_xl1.pt -o out/
    """
    from ..predict import predict_image

    boxes = [parse_floats(b, 4, "--box") for b in box or []]
    points = [_parse_point(p) for p in point or []]
    if not boxes and not points:
        raise typer.BadParameter("give at least one --box or --point", param_hint="--box/--point")
    if len(boxes) > 1 and points:
        raise typer.BadParameter("points combine with at most one box (one prompt); several boxes are separate prompts")
    result = predict_image(
        image_path=image,
        output=output,
        model_name=model,
        checkpoint=checkpoint,
        boxes=boxes,
        points=points,
        multimask_output=multimask,
        device=device,
    )

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
    console.print(f"encoder {result['encoder_seconds']:.2f} s, decoder {result['decoder_seconds']:.2f} s -> {output}")

"""`evsam data`: dataset utilities (a small synthetic dataset in the real formats)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from .common import command, console
from .help import EvsamCommand

app = typer.Typer(
    help="Dataset utilities.", no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]}
)


class SynthFormat(str, Enum):
    coco = "coco"
    sa1b = "sa1b"


@app.command("synth", cls=EvsamCommand, no_args_is_help=True)
@command
def synth_cli(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write the dataset into.")],
    format: Annotated[
        SynthFormat, typer.Option("--format", help="coco (COCO + LVIS + detections) or sa1b.")
    ] = SynthFormat.coco,
    images: Annotated[int, typer.Option("--images", min=1, help="Number of images.")] = 8,
    size: Annotated[
        int, typer.Option("--size", min=32, help="Longest image side (pixels, approximate).")
    ] = 320,
    shards: Annotated[
        int, typer.Option("--shards", min=0, help="sa1b only: pack into this many .tar shards.")
    ] = 0,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same dataset).")] = 0,
) -> None:
    """Write a small procedurally generated dataset with exact instance masks.

    [bold]coco[/bold]: val2017/, annotations/instances_val2017.json, annotations/lvis_v1_val.json and
    annotations/detections_val2017.json (COCO-results boxes) -- the layout `evsam eval --data-root` reads.
    [bold]sa1b[/bold]: sa_<id>.jpg + sa_<id>.json pairs (or .tar shards), the layout SA-1B ships in.

    Examples:

      evsam data synth --format coco --images 16 -o data/coco_synth

      evsam data synth --format sa1b --images 64 --shards 4 -o data/sa1b_synth
    """
    from ..data.synthetic import write_coco, write_sa1b

    if format is SynthFormat.coco:
        if shards:
            raise typer.BadParameter("--shards applies to --format sa1b only")
        paths = write_coco(output, num_images=images, image_size=size, seed=seed)
        for key, path in paths.items():
            console.print(f"{key:12s} {path}")
    else:
        files = write_sa1b(output, num_images=images, image_size=size, shards=shards, seed=seed)
        console.print(f"{len(files)} {'shards' if shards else 'image/annotation pairs'} in {output}")

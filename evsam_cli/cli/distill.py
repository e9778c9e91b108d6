"""`evsam distill`: distil SAM-ViT's image encoder into an EfficientViT-SAM student on SA-1B."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from ..train.config import TEACHERS, DistillConfig, defaults
from . import common as opt
from .common import check_resume, command, console, env_rank, setup_logging

if TYPE_CHECKING:
    TeacherName = str
else:
    TeacherName = Literal[TEACHERS]

D = defaults(DistillConfig)  # every default of `evsam distill` is the library's


@command
@opt.with_train_options(D)
def distill_cli(
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Run folder (metrics, checkpoints, student.pt).")
    ],
    teacher: Annotated[
        TeacherName, typer.Option(help="SAM image encoder to learn from (SAM ViTs, MobileSAM or LiteMedSAM).")
    ] = D["teacher"],
    teacher_checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="The teacher's official file (sam_vit_*.pth, mobile_sam.pt, lite_medsam.pth); required unless --resume."
        ),
    ] = None,
    student: Annotated[str, typer.Option(help="EfficientViT-SAM variant to train (l0 ... xl1).")] = D[
        "student"
    ],
    data: Annotated[
        Path | None,
        typer.Option(help="SA-1B: folder of sa_*.jpg + sa_*.json, or of sa_*.tar shards (or one .tar)."),
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option(
            help="Student input side (multiple of 32). Default: the student's own (512 L*, 1024 XL*)."
        ),
    ] = D["image_size"],
    teacher_cache: Annotated[
        Path | None,
        typer.Option(
            help="Folder caching teacher embeddings (fp16, 2 MiB per image) across epochs and runs."
        ),
    ] = None,
    **train: Any,
) -> None:
    """Distil a SAM ViT image encoder into an EfficientViT-SAM student (MSE on image embeddings).

    Writes [bold]metrics.jsonl[/bold] (step, loss, lr, data_wait_s, cache hits; val_mse at validations),
    [bold]checkpoints/last.pt[/bold] (resumable), [bold]student.pt[/bold] (the full model with SAM's prompt
    encoder and mask decoder from the teacher file) and [bold]summary.json[/bold] in --output.

    Examples:

      evsam distill --teacher vit_h --teacher-checkpoint sam_vit_h_4b8939.pth --student efficientvit-sam-l0 --data SA1B_DIR --output runs/l0

      evsam distill ... --teacher-cache /scratch/vit_h_cache --epochs 2 --batch-size 16

      torchrun --nproc-per-node 8 -m evsam_cli distill ... --output runs/l0

      evsam distill --output runs/l0 --resume
    """
    from ..train.config import from_flat
    from ..train.distill import distill
    from ..utils import distributed as dist_utils

    resume, overwrite, progress = train["resume"], train["overwrite"], train["progress"]
    check_resume(resume, overwrite)
    if not resume and teacher_checkpoint is None:
        raise typer.BadParameter(
            "--teacher-checkpoint is required (Meta's sam_vit_*.pth)", param_hint="--teacher-checkpoint"
        )
    if not resume and data is None:
        raise typer.BadParameter("--data is required (an SA-1B folder or .tar shards)", param_hint="--data")
    setup_logging(main_process=dist_utils.get_info().is_main or env_rank() == 0)
    cfg = from_flat(
        DistillConfig,
        teacher=teacher,
        teacher_checkpoint=str(teacher_checkpoint or "-"),
        student=student,
        image_size=image_size,
        teacher_cache=str(teacher_cache) if teacher_cache else None,
        **opt.train_settings(locals(), train),
    )
    summary = distill(cfg, resume=resume, overwrite=overwrite, progress=progress)
    if env_rank() != 0:
        return
    from rich.table import Table

    table = Table(title=f"distill {summary['teacher']} -> {summary['student']}")
    table.add_column("")
    table.add_column("value", justify="right")
    rows = [
        ("steps", str(summary["steps"])),
        ("images", str(summary["images"])),
        ("images/s", f"{summary['images_per_s']:.2f}"),
        ("final loss", _fmt(summary["final_loss"])),
        ("val mse", _fmt(summary["val_mse"])),
        ("teacher forwards", str(summary["teacher_forwards"])),
        ("skipped images", str(len(summary["skipped_images"]))),
        ("student weights", summary["student_weights"]),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.5g}"

"""`evsam finetune`: end-to-end training of EfficientViT-SAM on SA-1B or COCO-format data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..train.config import FinetuneConfig, defaults
from . import common as opt
from .common import check_resume, command, console, env_rank, setup_logging

D = defaults(FinetuneConfig)  # every default of `evsam finetune` is the library's


@command
@opt.with_train_options(D)
def finetune_cli(
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Run folder (metrics, checkpoints, model.pt).")
    ],
    model: Annotated[str, typer.Option("--model", "-m", help="EfficientViT-SAM variant (l0 ... xl1).")] = D[
        "model"
    ],
    init: Annotated[
        Path | None,
        typer.Option(help="Start from this file: a student from `evsam distill` or an official checkpoint."),
    ] = None,
    sam_head_checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="Without --init: take SAM's prompt encoder and mask decoder from this sam_vit_*.pth."
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="SA-1B folder/shards, or the image folder of a COCO-format set (with --annotations)."
        ),
    ] = None,
    annotations: Annotated[
        Path | None,
        typer.Option(help="COCO instances JSON: train on your own data (--data is its image folder)."),
    ] = None,
    images: Annotated[Path | None, typer.Option(help="Alias of --data for COCO-format data.")] = None,
    image_size: Annotated[
        int | None, typer.Option(help="Encoder input side (multiple of 32). Default: the model's own.")
    ] = D["image_size"],
    masks_per_image: Annotated[int, typer.Option(min=1, help="Masks (prompts) sampled per image.")] = D[
        "masks_per_image"
    ],
    freeze_bn: Annotated[
        bool,
        typer.Option(
            "--freeze-bn/--train-bn", help="Keep the encoder's BatchNorm statistics fixed while training."
        ),
    ] = D["freeze_bn"],
    freeze_encoder: Annotated[
        bool,
        typer.Option(
            "--freeze-encoder",
            help="Freeze the image encoder; train the prompt encoder and mask decoder on cached embeddings.",
        ),
    ] = D["freeze_encoder"],
    embedding_cache: Annotated[
        Path | None,
        typer.Option(
            help="With --freeze-encoder: embedding cache to share between runs (default: in --output)."
        ),
    ] = D["embedding_cache"],
    **train: Any,
) -> None:
    """Train a whole EfficientViT-SAM end to end: 20 x focal + 1 x dice on box / 1-10 point prompts.

    Writes [bold]metrics.jsonl[/bold] (step, loss, focal, dice; val_iou in percent at validations),
    [bold]checkpoints/last.pt[/bold] (resumable), [bold]model.pt[/bold] (last), [bold]model_best.pt[/bold]
    (best val_iou) and [bold]summary.json[/bold] in --output.

    Examples:

      evsam finetune --model l0 --init runs/l0/student.pt --data SA1B_DIR --output runs/l0_ft

      evsam finetune --model l0 --init efficientvit_sam_l0.pt --data my/images --annotations my/instances.json --output runs/mine

      evsam finetune --model l0 --init efficientvit_sam_l0.pt --data my/images --annotations my/instances.json --freeze-encoder --embedding-cache cache/ --output runs/mine_frozen

      torchrun --nproc-per-node 8 -m evsam_cli finetune --model l0 --init runs/l0/student.pt --data SA1B_DIR --output runs/l0_ft
    """
    from ..train.config import from_flat
    from ..train.finetune import finetune

    resume, overwrite, progress = train["resume"], train["overwrite"], train["progress"]
    check_resume(resume, overwrite)
    if images is not None and data is not None and images != data:
        raise typer.BadParameter("--images and --data name the same thing; give one")
    data = data or images
    if not resume and data is None:
        raise typer.BadParameter("--data is required (SA-1B, or a COCO image folder with --annotations)")
    rank = env_rank()
    setup_logging(main_process=rank == 0)
    cfg = from_flat(
        FinetuneConfig,
        model=model,
        init=str(init) if init else None,
        sam_head_checkpoint=str(sam_head_checkpoint) if sam_head_checkpoint else None,
        image_size=image_size,
        masks_per_image=masks_per_image,
        annotations=str(annotations) if annotations else None,
        freeze_bn=freeze_bn,
        freeze_encoder=freeze_encoder,
        embedding_cache=str(embedding_cache) if embedding_cache else None,
        **opt.train_settings(locals(), train),
    )
    summary = finetune(cfg, resume=resume, overwrite=overwrite, progress=progress)
    if rank != 0:
        return
    from rich.table import Table

    table = Table(title=f"finetune {summary['model']}")
    table.add_column("")
    table.add_column("value", justify="right")
    best = summary["best"] or {}
    for name, value in (
        ("steps", str(summary["steps"])),
        ("images", str(summary["images"])),
        ("images/s", f"{summary['images_per_s']:.2f}"),
        ("steps/s", f"{summary['steps_per_s']:.3g}"),
        ("final loss", "-" if summary["final_loss"] is None else f"{summary['final_loss']:.4g}"),
        ("val IoU (%)", "-" if summary["val_iou"] is None else f"{summary['val_iou']:.2f}"),
        ("best val IoU (%)", f"{best['val_iou']:.2f} @ {best['step']}" if best else "-"),
        ("skipped images", str(len(summary["skipped_images"]))),
        *(
            [("embedding cache hits / misses", f"{cache['hits']} / {cache['misses']}")]
            if (cache := summary["embedding_cache"])
            else []
        ),
        ("weights", summary["weights"]),
    ):
        table.add_row(name, value)
    console.print(table)

"""`evsam eval`: zero-shot COCO / LVIS instance segmentation with box, click or detector prompts."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from ..errors import EvsamError
from ..evaluation.detectors import detector_names
from .common import (
    CheckpointOption,
    DtypeOption,
    InferenceDtype,
    ModelOption,
    command,
    console,
    env_rank,
    error,
    setup_logging,
)

if TYPE_CHECKING:
    DetectorName = str
else:
    DetectorName = Literal[detector_names()]  # the registered detectors


class Dataset(str, Enum):
    coco = "coco"
    lvis = "lvis"


class Prompt(str, Enum):
    box = "box"
    point = "point"
    detector = "detector"


@command(aliases={"weights": "detector_weights", "config": "detector_config"})
def eval_cli(
    dataset: Annotated[Dataset, typer.Argument(help="coco (val2017) or lvis (LVIS v1 val).")],
    data_root: Annotated[
        Path | None,
        typer.Option(
            help="Standard layout: val2017/ (+ train2017/ for LVIS), annotations/instances_val2017.json, "
            "annotations/lvis_v1_val.json. Default: ./coco unless --images and --annotations are given."
        ),
    ] = None,
    images: Annotated[
        Path | None,
        typer.Option(help="COCO: the folder of image files. LVIS: the root holding train2017/ and val2017/."),
    ] = None,
    annotations: Annotated[
        Path | None, typer.Option(help="Instance annotation JSON (COCO or LVIS v1).")
    ] = None,
    model: ModelOption = "l0",
    checkpoint: CheckpointOption = None,
    prompt: Annotated[
        Prompt | None,
        typer.Option(help="box (GT boxes), point (simulated clicks) or detector boxes. Default: box."),
    ] = None,
    clicks: Annotated[int, typer.Option(min=1, help="Point prompts: number of clicks per object.")] = 1,
    detector: Annotated[
        DetectorName | None, typer.Option(help="Box source for detector prompts (implies --prompt detector).")
    ] = None,
    detections: Annotated[
        Path | None,
        typer.Option(
            help="COCO-results JSON: vitdet's boxes, or the cache yolov8/groundingdino read or write."
        ),
    ] = None,
    detector_weights: Annotated[
        str | None,
        typer.Option(
            help="Live detector's weights (yolov8 default yolov8x.pt; groundingdino_swint_ogc.pth)."
        ),
    ] = None,
    detector_config: Annotated[
        Path | None, typer.Option(help="groundingdino: config (GroundingDINO_SwinT_OGC.py).")
    ] = None,
    text_encoder: Annotated[
        Path | None,
        typer.Option(
            help="groundingdino: local bert-base-uncased folder (model + tokenizer), for offline use."
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Folder for metrics.json (default runs/eval/<dataset>-<prompt>)."
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Evaluate only the first N images.")] = None,
    device: Annotated[
        str, typer.Option(help="cpu, cuda, cuda:1 ... (under torchrun each rank takes its GPU).")
    ] = "cpu",
    batch_size: Annotated[
        int | None, typer.Option(min=1, help="Images per encoder pass [default: 1 on a CPU, 4 on a GPU].")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            min=0, help="Threads reading images ahead of the model [default: cores less one, at most 4]."
        ),
    ] = None,
    dtype: DtypeOption = InferenceDtype.fp32,
    compare_fp32: Annotated[
        bool,
        typer.Option(
            "--compare-fp32",
            help="With --dtype bf16/fp16: also evaluate in fp32 (into OUTPUT/fp32) and report the difference.",
        ),
    ] = False,
    input_size: Annotated[
        int | None, typer.Option(hidden=True, help="Encoder input override (quick tests).")
    ] = None,
) -> None:
    """Evaluate a model zero-shot on COCO or LVIS instance segmentation.

    [bold]box[/bold] and [bold]point[/bold] prompts report mIoU (percent) overall and by COCO area;
    [bold]detector[/bold] prompts turn detected boxes into masks, write [bold]predictions.json[/bold] and
    report mask AP (COCOeval, or LVISEval with APr/APc/APf). Writes [bold]metrics.json[/bold] to --output.
    Runs sharded under torchrun with the same results.

    Examples:

      evsam eval coco --data-root coco -m l0 --checkpoint efficientvit_sam_l0.pt --prompt box -o runs/l0-box

      evsam eval coco --data-root coco -m xl1 --checkpoint efficientvit_sam_xl1.pt --prompt point --clicks 3

      evsam eval lvis --data-root coco -m l1 --checkpoint efficientvit_sam_l1.pt --detector vitdet --detections lvis_vitdet.json

      evsam eval --detector yolov8 coco --detector-weights yolov8x.pt

      evsam eval coco --data-root coco -m l0 --checkpoint efficientvit_sam_l0.pt --dtype bf16 --compare-fp32

      torchrun --nproc-per-node 8 -m evsam_cli eval coco --data-root coco --device cuda --detector vitdet --detections coco_vitdet.json
    """
    rank = env_rank()
    setup_logging(main_process=rank == 0)

    if prompt is None:
        prompt = Prompt.detector if detector is not None else Prompt.box
    if detector is not None and prompt is not Prompt.detector:
        raise typer.BadParameter(f"--detector goes with --prompt detector, not --prompt {prompt.value}")
    if prompt is Prompt.detector and detector is None:
        raise typer.BadParameter(f"--prompt detector needs --detector {'|'.join(detector_names())}")
    if data_root is None and (images is None or annotations is None):
        data_root = Path("coco")
    if output is None:
        suffix = f"-{detector}" if detector is not None else ""
        output = Path("runs") / "eval" / f"{dataset.value}-{prompt.value}{suffix}"
    from ..evaluation import DetectorOptions

    options = DetectorOptions(
        name=detector if detector is not None else "vitdet",
        detections=detections,
        weights=Path(detector_weights) if detector_weights is not None else None,
        config=detector_config,
        text_encoder=text_encoder,
    )
    if compare_fp32 and dtype is InferenceDtype.fp32:
        raise typer.BadParameter("--compare-fp32 goes with --dtype bf16 or fp16", param_hint="--compare-fp32")
    runs = [(dtype.value, output)] + ([("fp32", output / "fp32")] if compare_fp32 else [])
    results = []
    for run_dtype, run_output in runs:
        results.append(
            _evaluate(
                rank,
                dataset=dataset.value,
                output=run_output,
                model=model,
                checkpoint=checkpoint,
                prompt=prompt.value,
                clicks=clicks,
                detector=options,
                data_root=data_root,
                images=images,
                annotations=annotations,
                limit=limit,
                device=device,
                batch_size=batch_size,
                workers=workers,
                input_size=input_size,
                dtype=run_dtype,
            )
        )
    if rank == 0:
        _render(results[0], output)
        if compare_fp32:
            _render_comparison(results[0], results[1], output)


def _evaluate(rank: int, **kwargs: Any) -> dict[str, Any]:
    from ..evaluation import evaluate

    try:
        with _progress(rank == 0) as update:
            return evaluate(**kwargs, progress=update)
    except ValueError as exc:  # e.g. an input size the model cannot take
        if isinstance(exc, EvsamError):
            raise  # the error edge shows its parameters as flags
        error(str(exc))
        raise typer.Exit(1) from None


def _scores(metrics: dict[str, Any]) -> dict[str, float | None]:
    return metrics["miou"] if metrics["miou"] is not None else metrics["segm"]


def _minus(x: float | None, y: float | None) -> float | None:
    return None if x is None or y is None else x - y


def _render_comparison(reduced: dict[str, Any], fp32: dict[str, Any], output: Path) -> None:
    """The metric difference (percentage points) of the reduced-precision run against fp32,
    printed and written to OUTPUT/compare_fp32.json."""
    from ..utils.io import write_json_atomic

    a, b = _scores(reduced), _scores(fp32)
    diff = {k: _minus(a[k], b[k]) for k in a}
    write_json_atomic(
        output / "compare_fp32.json",
        {"dtype": reduced["dtype"], reduced["dtype"]: a, "fp32": b, "difference_points": diff},
    )
    shown = ", ".join(f"{k} {v:+.2f}" for k, v in diff.items() if v is not None)
    console.print(f"{reduced['dtype']} minus fp32 (points): {shown} -> {output / 'compare_fp32.json'}")


class _progress:
    """A rich progress bar on rank 0 (nothing elsewhere); yields the library's callback."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.task: Any = None

    def __enter__(self) -> Any:
        if not self.enabled:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("evaluating"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self.bar.start()

        def update(done: int, total: int) -> None:
            if self.task is None:
                self.task = self.bar.add_task("eval", total=total)
            self.bar.update(self.task, completed=done)

        return update

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


def _render(metrics: dict[str, Any], output: Path) -> None:
    from rich.table import Table

    title = f"{metrics['model']} on {metrics['dataset']} ({metrics['prompt']}"
    title += f", {metrics['detector']})" if metrics["detector"] else ")"
    table = Table(title=title)
    scores = metrics["miou"] if metrics["miou"] is not None else metrics["segm"]
    label = "mIoU" if metrics["miou"] is not None else "mask"
    table.add_column("metric")
    table.add_column("value (%)", justify="right")
    for key, value in scores.items():
        table.add_row(f"{label} {key}", _fmt(value))
    console.print(table)
    skipped = len(metrics["skipped_images"])
    console.print(
        f"{metrics['num_images']} images, {metrics['num_prompts']} prompts in {metrics['seconds']:.1f} s "
        f"({metrics['images_per_s'] or 0:.2f} images/s)"
        + (f", {skipped} skipped" if skipped else "")
        + f" -> {output}"
    )

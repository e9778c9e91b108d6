"""What every command shares: consoles, the error edge, progress, small parsers and options.

Library code raises ``EvsamError`` subclasses; ``command`` turns them (and the OS errors a
user can cause, such as a missing or unwritable path) into one ``Error: ...`` line on stderr
and exit code 1. ``--debug`` or ``EVSAM_DEBUG=1`` lets the traceback through instead. Library
messages speak parameter names (``lr must be positive``); an error lists the names it mentions
(``params``) and the edge shows each as the command's flag for it (``--lr must be positive``).

Options that several commands declare alike are ``Annotated`` aliases here (flag names and help);
their defaults are the library's, e.g. ``steps: StepsOption = defaults(DistillConfig)["steps"]``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from enum import Enum
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler

from ..errors import EvsamError

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

_state = {"debug": False}


def set_debug(enabled: bool) -> None:
    _state["debug"] = enabled


def debug_enabled() -> bool:
    return _state["debug"] or os.environ.get("EVSAM_DEBUG", "") not in ("", "0", "false", "False")


def error(message: str) -> None:
    """Print the one-line error (markup-free, so paths with brackets print as they are)."""
    err_console.print(f"[bold red]Error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)


def escape(text: str) -> str:
    from rich.markup import escape as _escape

    return _escape(str(text))


def command(fn: F | None = None, *, aliases: dict[str, str] | None = None) -> Any:
    """Decorator for command bodies: user errors -> ``Error:`` line and exit code 1.

    ``aliases`` maps library parameter names to the command's own where they differ (e.g.
    ``{"weights": "detector_weights"}``), so that errors show the right flag.
    """
    if fn is None:
        return functools.partial(command, aliases=aliases)
    flags: dict[str, str] | None = None

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            error("interrupted")
            raise typer.Exit(130) from None
        except EvsamError as exc:
            if debug_enabled():
                raise
            nonlocal flags
            if flags is None:
                flags = option_flags(fn)
                flags.update({lib: flags[own] for lib, own in (aliases or {}).items() if own in flags})
            error(as_flags(exc, flags))
            raise typer.Exit(1) from None
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
            if debug_enabled():
                raise
            where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
            error(f"{exc.strerror or exc}{where}")
            raise typer.Exit(1) from None
        except json.JSONDecodeError as exc:
            if debug_enabled():
                raise
            error(f"malformed JSON: {exc}")
            raise typer.Exit(1) from None
        finally:
            _leave_process_group()

    return wrapper


def option_flags(fn: Callable[..., Any]) -> dict[str, str]:
    """Parameter name -> how the user writes it, for a typer command function: ``lr`` -> ``--lr``,
    ``amp`` -> ``--amp``, ``image`` (an argument) -> ``IMAGE``."""
    flags = {}
    for name, param in inspect.signature(fn, eval_str=True).parameters.items():
        for meta in getattr(param.annotation, "__metadata__", ()):
            if isinstance(meta, typer.models.ArgumentInfo):
                flags[name] = name.upper()
            elif isinstance(meta, typer.models.OptionInfo):
                longs = [d.split("/")[0] for d in meta.param_decls or () if d.startswith("--")]
                flags[name] = longs[0] if longs else "--" + name.replace("_", "-")
    return flags


def as_flags(exc: EvsamError, flags: dict[str, str]) -> str:
    """``exc``'s message with the parameter names it mentions (``exc.params``) shown as flags."""
    message = str(exc)
    for name in exc.params:
        if name in flags:
            message = re.sub(rf"(?<![\w-]){re.escape(name)}(?!\w)", flags[name], message)
    return message


def _leave_process_group() -> None:
    """Destroy the torchrun process group a command joined (a gloo group left to the interpreter's
    exit can abort the process: "terminate called without an active exception", exit code -6).
    Commands that never imported torch.distributed skip this without importing torch."""
    if "torch.distributed" in sys.modules:
        from ..utils import distributed

        distributed.cleanup()


def setup_logging(verbose: bool = False, *, main_process: bool = True) -> None:
    """Rich logging on the main process only; other ranks log warnings and errors."""
    level = logging.DEBUG if verbose else logging.INFO
    if not main_process:
        level = logging.WARNING
    logging.basicConfig(
        level=level,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=err_console, show_path=False, rich_tracebacks=False)],
        force=True,
    )


@contextlib.contextmanager
def progress_task(
    *columns: Any, total: float | None = None, out: Console = console
) -> Iterator[tuple[Any, Any]]:
    """A rich progress display with ``columns`` that vanishes when done, and its one task
    (described "starting"): ``with progress_task(...) as (bar, task): ... bar.update(task, ...)``."""
    from rich.progress import Progress

    with Progress(*columns, console=out, transient=True) as bar:
        yield bar, bar.add_task("starting", total=total)


def parse_floats(text: str, count: int | None, what: str) -> list[float]:
    """'1,2,3' -> [1.0, 2.0, 3.0]; ``typer.BadParameter`` naming ``what`` otherwise."""
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise typer.BadParameter(f"{what} must be comma-separated numbers, got {text!r}") from None
    if count is not None and len(values) != count:
        raise typer.BadParameter(f"{what} needs {count} comma-separated numbers, got {text!r}")
    return values


def env_rank() -> int:
    """This process's rank as torchrun sets it (0 outside torchrun), known before any process group."""
    return int(os.environ.get("RANK", "0"))


# ---------------------------------------------------------------------------- shared options
# `evsam predict` and `evsam eval`: the model to run.
ModelOption = Annotated[str, typer.Option("--model", "-m", help="Model name or alias (see `evsam models`).")]
CheckpointOption = Annotated[
    str | None,
    typer.Option(help="Weights file, or 'hub' for the official release. Default: random weights."),
]


class InferenceDtype(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


# `evsam predict` and `evsam eval`: the predictor's precision (accel/precision.py).
DtypeOption = Annotated[
    InferenceDtype,
    typer.Option(
        help="Precision of the encoder and decoder: bf16 on CPUs with bf16 instructions and GPUs, "
        "fp16 on GPUs (docs/precision.md)."
    ),
]

# `evsam distill` and `evsam finetune`: the training loop, optimizer and data loading.
StepsOption = Annotated[int, typer.Option(min=1, help="Optimizer steps (ignored when --epochs is given).")]
EpochsOption = Annotated[
    float | None, typer.Option(min=0.0, help="Train for this many passes over the data.")
]
TrainBatchSizeOption = Annotated[int, typer.Option(min=1, help="Images per micro-batch, per process.")]
GradAccumOption = Annotated[int, typer.Option(min=1, help="Micro-batches per optimizer step.")]
LrOption = Annotated[float, typer.Option(help="Peak learning rate (AdamW, warmup then cosine).")]
WeightDecayOption = Annotated[float, typer.Option(help="AdamW weight decay (not on norms/biases).")]
WarmupStepsOption = Annotated[
    int | None, typer.Option(min=0, help="Linear warmup steps. Default: a tenth of the run, at most 250.")
]
GradClipOption = Annotated[float, typer.Option(min=0.0, help="Max gradient norm (0: off).")]
SaveEveryOption = Annotated[int, typer.Option(min=1, help="Write checkpoints/last.pt every N steps.")]
LogEveryOption = Annotated[int, typer.Option(min=1, help="Write a metrics.jsonl record every N steps.")]
TrainWorkersOption = Annotated[
    int | None,
    typer.Option(min=0, help="Data-loader processes per rank. Default: its CPU cores less one, at most 4."),
]
ValImagesOption = Annotated[
    int | None,
    typer.Option(
        min=0,
        help="Images held out for validation. Default: a tenth, at most 16, at least 1 of 2 or more.",
    ),
]
ValEveryOption = Annotated[
    int, typer.Option(min=0, help="Validate every N steps, at step 0 and at the end (0: only those).")
]
TrainDeviceOption = Annotated[
    str, typer.Option(help="auto, cpu, cuda (under torchrun: each rank its LOCAL_RANK GPU).")
]
AmpOption = Annotated[bool, typer.Option("--amp/--no-amp", help="Mixed precision on GPU (bf16, else fp16).")]
ResumeOption = Annotated[
    bool, typer.Option("--resume", help="Continue the run in --output from checkpoints/last.pt.")
]
OverwriteOption = Annotated[bool, typer.Option("--overwrite", help="Replace a run already in --output.")]
ProgressOption = Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bar on rank 0.")]
SeedOption = Annotated[int, typer.Option(help="Random seed (data order, prompts, initialisation).")]


# The options distill and finetune share, as the library names them (``train.config.defaults``),
# in --help order; ``with_train_options`` adds them to both commands.
_TRAIN_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("steps", StepsOption),
    ("epochs", EpochsOption),
    ("batch_size", TrainBatchSizeOption),
    ("grad_accum", GradAccumOption),
    ("lr", LrOption),
    ("weight_decay", WeightDecayOption),
    ("warmup_steps", WarmupStepsOption),
    ("grad_clip", GradClipOption),
    ("val_images", ValImagesOption),
    ("val_every", ValEveryOption),
    ("save_every", SaveEveryOption),
    ("log_every", LogEveryOption),
    ("workers", TrainWorkersOption),
    ("seed", SeedOption),
    ("device", TrainDeviceOption),
    ("amp", AmpOption),
    ("resume", ResumeOption),
    ("overwrite", OverwriteOption),
    ("progress", ProgressOption),
)


def with_train_options(defaults: dict[str, Any]) -> Callable[[F], F]:
    """Add the training options distill and finetune share to a command, after its own, with the
    command's library defaults (``train.config.defaults``; --resume, --overwrite and --progress
    default to off, off, on). The command receives them as ``**train``."""
    fixed = {"resume": False, "overwrite": False, "progress": True}

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn, eval_str=True)  # the Annotated options, not strings
        own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        shared = [
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=kind,
                default=fixed.get(name, defaults.get(name)),
            )
            for name, kind in _TRAIN_OPTIONS
        ]

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            return fn(**kwargs)

        wrapper.__signature__ = signature.replace(parameters=[*own, *shared])  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


def train_settings(args: dict[str, Any], train: dict[str, Any]) -> dict[str, Any]:
    """A train command's arguments (its ``locals()``, and the shared ``**train`` options) as flat
    library settings for ``train.config.from_flat``; ``--output`` and ``--data`` included."""
    settings = {
        name: train[name] for name, _ in _TRAIN_OPTIONS if name not in ("resume", "overwrite", "progress")
    }
    settings["output"] = str(args["output"])
    settings["path"] = str(args["data"] or "")
    return settings


def check_resume(resume: bool, overwrite: bool) -> None:
    """--resume continues the run in --output, --overwrite replaces it: never both."""
    if resume and overwrite:
        raise typer.BadParameter("--resume and --overwrite exclude each other")

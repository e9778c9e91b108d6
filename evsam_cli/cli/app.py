"""The ``evsam`` application: every subcommand registered in one place.

Command modules import torch and friends inside their bodies, so ``evsam --help`` is instant.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from .. import __version__
from ..accel.allocator import tune_cpu_allocator
from . import bench, data, distill, export, finetune, models_cmd, predict
from . import eval as eval_cmd
from .common import error, set_debug
from .help import EvsamCommand


class EvsamGroup(TyperGroup):
    """Usage mistakes (bad flag values, missing options) end like every other user error:
    one ``Error:`` line on stderr and exit code 1, instead of click's framed message and code 2."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)  # type: ignore[misc]  # not in args
        except typer.Abort:
            error("aborted")
            sys.exit(1)
        except typer.TyperException as exc:  # click's ClickException family, vendored by typer
            message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
            if not message.strip():  # no_args_is_help: the help text was the answer
                sys.exit(0)
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            error(f"{message}{hint}")
            sys.exit(1)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=EvsamGroup,
    name="evsam",
    help="EfficientViT-SAM toolkit: distill, finetune, export, benchmark and evaluate fast Segment Anything models.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"evsam {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[
        bool,
        typer.Option("--debug", help="Show full tracebacks instead of one-line errors (or EVSAM_DEBUG=1)."),
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    set_debug(debug)
    tune_cpu_allocator()  # CPU inference reuses freed memory instead of page-faulting it back


# EvsamCommand: help that shows every option name whole, whatever the terminal's width.
app.command("distill", cls=EvsamCommand, no_args_is_help=True)(distill.distill_cli)
app.command("finetune", cls=EvsamCommand, no_args_is_help=True)(finetune.finetune_cli)
app.command("export", cls=EvsamCommand, no_args_is_help=True)(export.export_cli)
app.command("bench", cls=EvsamCommand)(bench.bench_cli)
app.command("eval", cls=EvsamCommand, no_args_is_help=True)(eval_cmd.eval_cli)
app.command("predict", cls=EvsamCommand, no_args_is_help=True)(predict.predict_cli)
app.command("models", cls=EvsamCommand)(models_cmd.models_cli)
app.add_typer(data.app, name="data")


def main() -> None:
    app()


if __name__ == "__main__":
    main()

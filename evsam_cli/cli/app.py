"""The ``evsam`` application: every subcommand registered in one place.

Command modules import torch and friends inside their bodies, so ``evsam --help`` is instant.
"""

from __future__ import annotations

from typing import Annotated

import typer

from .. import __version__
from . import bench, data, distill, eval as eval_cmd, export, finetune, models_cmd, predict
from .common import set_debug

app = typer.Typer(
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
        bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors (or EVSAM_DEBUG=1).")
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    set_debug(debug)


app.command("distill", no_args_is_help=True)(distill.distill_cli)
app.command("finetune", no_args_is_help=True)(finetune.finetune_cli)
app.command("export", no_args_is_help=True)(export.export_cli)
app.command("bench")(bench.bench_cli)
app.command("eval", no_args_is_help=True)(eval_cmd.eval_cli)
app.command("predict", no_args_is_help=True)(predict.predict_cli)
app.command("models")(models_cmd.models_cli)
app.add_typer(data.app, name="data")


def main() -> None:
    app()


if __name__ == "__main__":
    main()

"""`evsam finetune`: end-to-end finetuning (not implemented yet)."""

from __future__ import annotations

import typer

from .common import error


def finetune_cli(ctx: typer.Context) -> None:
    """end-to-end finetuning (not implemented yet)."""
    error("evsam finetune is not implemented yet")
    raise typer.Exit(1)

"""`evsam eval`: zero-shot COCO/LVIS evaluation (not implemented yet)."""

from __future__ import annotations

import typer

from .common import error


def eval_cli(ctx: typer.Context) -> None:
    """zero-shot COCO/LVIS evaluation (not implemented yet)."""
    error("evsam eval is not implemented yet")
    raise typer.Exit(1)

"""`evsam distill`: knowledge distillation (not implemented yet)."""

from __future__ import annotations

import typer

from .common import error


def distill_cli(ctx: typer.Context) -> None:
    """knowledge distillation (not implemented yet)."""
    error("evsam distill is not implemented yet")
    raise typer.Exit(1)

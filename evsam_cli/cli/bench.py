"""`evsam bench`: benchmarking (not implemented yet)."""

from __future__ import annotations

import typer

from .common import error


def bench_cli(ctx: typer.Context) -> None:
    """benchmarking (not implemented yet)."""
    error("evsam bench is not implemented yet")
    raise typer.Exit(1)

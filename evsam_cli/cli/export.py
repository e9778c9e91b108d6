"""`evsam export`: ONNX/TensorRT export (not implemented yet)."""

from __future__ import annotations

import typer

from .common import error


def export_cli(ctx: typer.Context) -> None:
    """ONNX/TensorRT export (not implemented yet)."""
    error("evsam export is not implemented yet")
    raise typer.Exit(1)

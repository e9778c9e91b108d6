"""`evsam data` (being written)."""

from __future__ import annotations

import typer

app = typer.Typer(help="Dataset utilities.", no_args_is_help=True)

"""`evsam models` (being written)."""

from __future__ import annotations


def models_cli() -> None:
    """List the model zoo."""

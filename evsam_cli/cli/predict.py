"""`evsam predict` (being written)."""

from __future__ import annotations


def predict_cli() -> None:
    """Predict masks for an image."""

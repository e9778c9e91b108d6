"""The export package's own error type (an ``EvsamError``, so the CLI prints one line)."""

from __future__ import annotations

from ..errors import EvsamError


class ExportError(EvsamError):
    """An export could not be produced or does not match PyTorch within tolerance."""

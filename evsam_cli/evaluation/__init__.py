"""Zero-shot COCO / LVIS evaluation with box, click and detector-box prompts (`evsam eval`).

``evaluate`` loads lazily, so that the torch-free modules here (``detectors``, whose registry the
command line lists) import without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .detectors import DetectorOptions

if TYPE_CHECKING:
    from .runner import evaluate

__all__ = ["DetectorOptions", "evaluate"]


def __getattr__(name: str) -> Any:
    if name == "evaluate":
        from .runner import evaluate

        return evaluate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

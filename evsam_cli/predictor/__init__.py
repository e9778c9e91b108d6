"""Promptable prediction: ``SamPredictor`` (prompts -> masks on one image) and
``AutomaticMaskGenerator`` (segment everything), with segment-anything's semantics.

The two classes load lazily, so that the torch-free modules here (``amg_settings``, where the
command line reads its defaults and help) import without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .automatic import AutomaticMaskGenerator
    from .sam_predictor import SamPredictor

__all__ = ["AutomaticMaskGenerator", "SamPredictor"]


def __getattr__(name: str) -> Any:
    if name == "AutomaticMaskGenerator":
        from .automatic import AutomaticMaskGenerator

        return AutomaticMaskGenerator
    if name == "SamPredictor":
        from .sam_predictor import SamPredictor

        return SamPredictor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

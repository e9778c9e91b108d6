"""Zero-shot COCO / LVIS evaluation with box, click and detector-box prompts (`evsam eval`)."""

from .runner import DetectorOptions, evaluate

__all__ = ["DetectorOptions", "evaluate"]

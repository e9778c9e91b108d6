"""Promptable prediction: ``SamPredictor`` (prompts -> masks on one image) and
``AutomaticMaskGenerator`` (segment everything), with segment-anything's semantics."""

from .automatic import AutomaticMaskGenerator
from .sam_predictor import SamPredictor

__all__ = ["AutomaticMaskGenerator", "SamPredictor"]

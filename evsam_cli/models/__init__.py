"""The model zoo: EfficientViT-SAM L0-XL1 and SAM ViT-B/L/H behind one ``create_model``.

``models/`` holds the models as the papers define them (SAM's prompt encoder and mask decoder,
EfficientViT and SAM ViT image encoders); speed-ups applied from outside live in ``accel/``.
"""

from .checkpoints import (
    download_checkpoint,
    export_state_dict,
    hub_dir,
    load_checkpoint,
    read_state_dict,
    save_weights,
)
from .sam import Sam
from .zoo import ModelSpec, create_model, get_spec, list_models, resolve_name

__all__ = [
    "ModelSpec",
    "Sam",
    "create_model",
    "download_checkpoint",
    "export_state_dict",
    "get_spec",
    "hub_dir",
    "list_models",
    "load_checkpoint",
    "read_state_dict",
    "resolve_name",
    "save_weights",
]

"""Model zoo: EfficientViT-SAM L0-XL1 and SAM ViT-B/L/H behind one ``create_model``."""

from .registry import (
    ModelSpec,
    create_model,
    download_checkpoint,
    export_state_dict,
    get_spec,
    hub_dir,
    list_models,
    load_checkpoint,
    read_state_dict,
    resolve_name,
    save_weights,
)
from .sam import Sam

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

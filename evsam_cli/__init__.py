"""evsam: the EfficientViT-SAM toolkit (distill, finetune, export, bench, eval)."""

__version__ = "0.1.0"

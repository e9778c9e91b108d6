"""evsam: the EfficientViT-SAM toolkit (distill, finetune, export, bench, eval)."""

from .accel.allocator import tune_cpu_allocator

__version__ = "0.1.0"

__all__ = ["__version__", "tune_cpu_allocator"]

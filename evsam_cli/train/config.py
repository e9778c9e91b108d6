"""Typed training configuration: plain dataclasses, checked on construction, two levels deep.

A run's full configuration is written to ``OUTPUT/config.json`` and stored in every checkpoint,
so ``--resume`` continues with exactly the settings the run started with.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import EvsamError


class ConfigError(EvsamError):
    """A training setting is out of range."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``min_lr_ratio * lr``.

    Weight decay applies to matrices and convolution kernels only, never to norms and biases.
    """

    lr: float = 1e-3
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 100
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"--lr must be positive, got {self.lr}")
        _check(self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "AdamW betas must lie in [0, 1)")
        _check(self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        _check(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        _check(self.grad_clip >= 0, f"--grad-clip must be >= 0, got {self.grad_clip}")


@dataclass
class DataConfig:
    """Where the images come from and how they are batched (per rank, per micro-step)."""

    path: str = ""
    batch_size: int = 8
    workers: int = 2
    val_images: int = 16

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        _check(self.workers >= 0, f"--workers must be >= 0, got {self.workers}")
        _check(self.val_images >= 0, f"--val-images must be >= 0, got {self.val_images}")


@dataclass
class LoopConfig:
    """Length, cadence and machinery of the training loop."""

    output: str = "runs/train"
    steps: int = 1000  # optimizer steps; computed from ``epochs`` when that is given
    epochs: float | None = None
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # mixed precision on CUDA (bf16 where supported, else fp16 + loss scaling)
    log_every: int = 10
    val_every: int = 500  # 0: validate only at the end
    save_every: int = 500

    def __post_init__(self) -> None:
        _check(self.steps >= 1, f"--steps must be >= 1, got {self.steps}")
        _check(self.epochs is None or self.epochs > 0, f"--epochs must be positive, got {self.epochs}")
        _check(self.grad_accum >= 1, f"--grad-accum must be >= 1, got {self.grad_accum}")
        _check(self.log_every >= 1, f"--log-every must be >= 1, got {self.log_every}")
        _check(self.val_every >= 0, f"--val-every must be >= 0, got {self.val_every}")
        _check(self.save_every >= 1, f"--save-every must be >= 1, got {self.save_every}")


@dataclass
class DistillConfig:
    """``evsam distill``: the student's image encoder learns the teacher's image embedding (MSE)."""

    teacher: str = "vit_h"
    teacher_checkpoint: str = ""
    student: str = "efficientvit-sam-l0"
    image_size: int | None = None  # student input side; None: the student's own (512 L*, 1024 XL*)
    teacher_cache: str | None = None
    loop: LoopConfig = field(default_factory=LoopConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        _check(
            self.teacher in ("vit_b", "vit_l", "vit_h"),
            f"--teacher must be vit_b, vit_l or vit_h, not {self.teacher!r}",
        )
        _check(bool(self.teacher_checkpoint), "--teacher-checkpoint is required")


@dataclass
class FinetuneConfig:
    """``evsam finetune``: the whole model, end to end, with 20 x focal + 1 x dice on sampled prompts."""

    model: str = "efficientvit-sam-l0"
    init: str | None = None
    sam_head_checkpoint: str | None = None
    image_size: int | None = None
    masks_per_image: int = 16
    annotations: str | None = None  # COCO-format data: the instances JSON (``data.path`` is the image folder)
    freeze_bn: bool = False  # keep BatchNorm statistics fixed (BN layers in eval mode) while training
    freeze_encoder: bool = False  # train the prompt encoder and mask decoder on cached image embeddings
    embedding_cache: str | None = None  # with freeze_encoder; None: OUTPUT/embedding_cache
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(output="runs/finetune"))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4))
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        _check(self.masks_per_image >= 1, f"--masks-per-image must be >= 1, got {self.masks_per_image}")
        _check(self.focal_weight >= 0 and self.dice_weight >= 0, "loss weights must be >= 0")
        _check(
            self.freeze_encoder or self.embedding_cache is None, "--embedding-cache needs --freeze-encoder"
        )


C = TypeVar("C")


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Rebuild a config saved with ``to_dict`` (nested dataclasses included)."""
    kwargs = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in data:
            continue
        value = data[f.name]
        sub = {"loop": LoopConfig, "optim": OptimConfig, "data": DataConfig}.get(f.name)
        kwargs[f.name] = sub(**value) if sub is not None and isinstance(value, dict) else value
    return cls(**kwargs)

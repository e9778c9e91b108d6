"""Typed training configuration: plain dataclasses, checked on construction, two levels deep.

Every training default lives here, once: ``evsam distill`` and ``evsam finetune`` read their
defaults from these classes (``defaults``) and build the nested configuration with
``from_flat``, so ``finetune(FinetuneConfig(...))`` from Python and ``evsam finetune`` with the
same values are the same run. Settings left at ``None`` are chosen from the machine and the run
by ``finalize`` (rules in docs/training.md) before training starts. The few section settings
whose default differs between the two commands (``lr``, ``batch_size``, ``val_every``,
``save_every``) are ``None`` in the sections and filled in by the command's config, so that
``FinetuneConfig(optim=OptimConfig(weight_decay=0.1))`` still trains at finetuning's ``lr``. A run's final configuration
is written to ``OUTPUT/config.json`` and stored in every checkpoint, so ``--resume`` continues
with exactly the settings the run started with.

Error messages name the parameters as they are spelled here (``lr must be positive``); the
command line shows them as its flags.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from ..errors import SettingError
from ..utils.cores import cores_per_process, default_workers

log = logging.getLogger("evsam.train")

TEACHERS = ("vit_b", "vit_l", "vit_h", "mobile_sam", "lite_medsam")  # train.distill.TEACHER_MODELS


class ConfigError(SettingError):
    """A training setting is out of range."""


def _check(ok: bool, message: str, *params: str) -> None:
    if not ok:
        raise ConfigError(message, *params)


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``min_lr_ratio * lr``.

    Weight decay applies to matrices and convolution kernels only, never to norms and biases.
    """

    lr: float = None  # type: ignore[assignment]  # None: the command's (DistillConfig/FinetuneConfig)
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int | None = None  # None: min(250, steps // 10)
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping

    def __post_init__(self) -> None:
        _check(self.lr is None or self.lr > 0, f"lr must be positive, got {self.lr}", "lr")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}", "weight_decay")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "AdamW betas must lie in [0, 1)")
        _check(
            self.warmup_steps is None or self.warmup_steps >= 0,
            f"warmup_steps must be >= 0, got {self.warmup_steps}",
            "warmup_steps",
        )
        _check(
            0 <= self.min_lr_ratio <= 1,
            f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}",
            "min_lr_ratio",
        )
        _check(self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}", "grad_clip")

    def warmup_for(self, steps: int) -> int:
        """Warmup steps of a run of ``steps`` steps: the setting, or a tenth of the run up to 250."""
        return self.warmup_steps if self.warmup_steps is not None else min(250, steps // 10)


@dataclass
class DataConfig:
    """Where the images come from and how they are batched (per rank, per micro-step)."""

    path: str = ""
    batch_size: int = None  # type: ignore[assignment]  # None: the command's
    workers: int | None = None  # None: from the CPU count (``default_workers``)
    val_images: int | None = None  # None: a share of the data (``data.sa1b.auto_val_images``)

    def __post_init__(self) -> None:
        _check(
            self.batch_size is None or self.batch_size >= 1,
            f"batch_size must be >= 1, got {self.batch_size}",
            "batch_size",
        )
        _check(
            self.workers is None or self.workers >= 0, f"workers must be >= 0, got {self.workers}", "workers"
        )
        _check(
            self.val_images is None or self.val_images >= 0,
            f"val_images must be >= 0, got {self.val_images}",
            "val_images",
        )

    def worker_count(self) -> int:
        return self.workers if self.workers is not None else default_workers()


@dataclass
class LoopConfig:
    """Length, cadence and machinery of the training loop."""

    output: str = "runs/train"
    steps: int = 10000  # optimizer steps; computed from ``epochs`` when that is given
    epochs: float | None = None
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # mixed precision on CUDA (bf16 where supported, else fp16 + loss scaling)
    log_every: int = 10
    val_every: int = None  # type: ignore[assignment]  # None: the command's; 0: only at step 0 and the end
    save_every: int = None  # type: ignore[assignment]  # None: the command's

    def __post_init__(self) -> None:
        _check(self.steps >= 1, f"steps must be >= 1, got {self.steps}", "steps")
        _check(
            self.epochs is None or self.epochs > 0, f"epochs must be positive, got {self.epochs}", "epochs"
        )
        _check(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}", "grad_accum")
        _check(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}", "log_every")
        _check(
            self.val_every is None or self.val_every >= 0,
            f"val_every must be >= 0, got {self.val_every}",
            "val_every",
        )
        _check(
            self.save_every is None or self.save_every >= 1,
            f"save_every must be >= 1, got {self.save_every}",
            "save_every",
        )


# Each command's own defaults of the section settings left at None.
COMMAND_DEFAULTS: dict[str, dict[str, Any]] = {
    "distill": {"lr": 1e-3, "batch_size": 8, "val_every": 1000, "save_every": 1000},
    "finetune": {"lr": 1e-4, "batch_size": 2, "val_every": 500, "save_every": 500},
}


@dataclass
class DistillConfig:
    """``evsam distill``: the student's image encoder learns the teacher's image embedding (MSE)."""

    teacher: str = "vit_h"
    teacher_checkpoint: str = ""
    student: str = "efficientvit-sam-l0"
    image_size: int | None = None  # student input side; None: the student's own (512 L*, 1024 XL*)
    teacher_cache: str | None = None
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(output="runs/distill"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)

    section_defaults: ClassVar[dict[str, Any]] = COMMAND_DEFAULTS["distill"]

    def __post_init__(self) -> None:
        _fill_sections(self)
        _check(
            self.teacher in TEACHERS,
            f"teacher must be {', '.join(TEACHERS[:-1])} or {TEACHERS[-1]}, not {self.teacher!r}",
            "teacher",
        )
        _check(bool(self.teacher_checkpoint), "teacher_checkpoint is required", "teacher_checkpoint")


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
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)

    section_defaults: ClassVar[dict[str, Any]] = COMMAND_DEFAULTS["finetune"]

    def __post_init__(self) -> None:
        _fill_sections(self)
        _check(
            self.masks_per_image >= 1,
            f"masks_per_image must be >= 1, got {self.masks_per_image}",
            "masks_per_image",
        )
        _check(
            self.focal_weight >= 0 and self.dice_weight >= 0,
            "focal_weight and dice_weight must be >= 0",
            "focal_weight",
            "dice_weight",
        )
        _check(
            self.freeze_encoder or self.embedding_cache is None,
            "embedding_cache needs freeze_encoder",
            "embedding_cache",
            "freeze_encoder",
        )


C = TypeVar("C")
_SECTIONS = {"loop": LoopConfig, "optim": OptimConfig, "data": DataConfig}


def _fill_sections(config: DistillConfig | FinetuneConfig) -> None:
    """Give the section settings left at None the command's own default (in copies: a section
    object the caller passed in stays as it was)."""
    for name in _SECTIONS:
        section = dataclasses.replace(getattr(config, name))
        setattr(config, name, section)
        for key, value in config.section_defaults.items():
            if hasattr(section, key) and getattr(section, key) is None:
                setattr(section, key, value)


def defaults(cls: type[Any]) -> dict[str, Any]:
    """Every setting of a run config and its default, flat: ``{"lr": 1e-4, "steps": 10000, ...}``.

    The nested sections' names are their fields' (``data.path`` is ``path``); this is where the
    command line reads its defaults.
    """
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in _SECTIONS:
            section = f.default_factory()  # type: ignore[operator]  # sections have one
            out.update({s.name: getattr(section, s.name) for s in dataclasses.fields(section)})
        elif f.default is not dataclasses.MISSING:
            out[f.name] = f.default
    out.update(cls.section_defaults)
    return out


def from_flat(cls: type[C], **settings: Any) -> C:
    """A run config from flat settings (names as in ``defaults``); the rest keep their defaults."""
    top = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for name, section_cls in _SECTIONS.items():
        own = {f.name for f in dataclasses.fields(section_cls)}
        given = {k: settings.pop(k) for k in list(settings) if k in own}
        if name in top:
            field = next(f for f in dataclasses.fields(cls) if f.name == name)  # type: ignore[arg-type]
            base = field.default_factory()  # type: ignore[operator]  # sections have one
            kwargs[name] = dataclasses.replace(base, **given)
    unknown = set(settings) - top
    if unknown:
        raise TypeError(f"{cls.__name__} has no setting {', '.join(sorted(unknown))}")
    return cls(**kwargs, **settings)


def finalize(config: DistillConfig | FinetuneConfig, *, val_images: int) -> None:
    """Fill the settings left to the machine and the run (``loop.steps`` is known by now; the data
    source chose ``val_images``), and warn once about explicit choices that make no sense here."""
    loop, optim, data = config.loop, config.optim, config.data
    data.val_images = val_images
    if optim.warmup_steps is None:
        optim.warmup_steps = optim.warmup_for(loop.steps)
    elif optim.warmup_steps >= loop.steps:
        log.warning(
            "warmup_steps=%d >= steps=%d: the learning rate never reaches lr=%g",
            optim.warmup_steps,
            loop.steps,
            optim.lr,
        )
    if data.workers is None:
        data.workers = default_workers()
    elif data.workers > (cores := cores_per_process()):
        log.warning(
            "workers=%d is more than the %d core(s) this process has: data loading competes with "
            "training for them",
            data.workers,
            cores,
        )


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Rebuild a config saved with ``to_dict`` (nested dataclasses included)."""
    kwargs = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in data:
            continue
        value = data[f.name]
        sub = _SECTIONS.get(f.name)
        kwargs[f.name] = sub(**value) if sub is not None and isinstance(value, dict) else value
    return cls(**kwargs)

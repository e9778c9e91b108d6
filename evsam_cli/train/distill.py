"""Knowledge distillation: an EfficientViT-SAM image encoder learns a SAM teacher's image embedding.

As in the paper, the loss is the mean squared error between the student's and the frozen
teacher's (256, 64, 64) embeddings of SA-1B images, each model seeing the image at its own
input size and with its own preprocessing. Teachers are SAM's ViTs (the paper's) or the
cheaper TinyViT SAMs: MobileSAM (1024 px) and LiteMedSAM (256 px, min-max normalised). The
teacher's forward pass is the dominant cost (ViT-H is ~3 TFLOPs per image), so its embeddings
go through an ``EmbeddingCache`` (the one ``finetune --freeze-encoder`` uses): computed once per
image, reused across epochs and runs, and the teacher is not even built while every image it is
asked for is cached.

The distilled ``student.pt`` is a complete model: the student's encoder plus SAM's prompt
encoder and mask decoder taken from the teacher checkpoint (the paper keeps SAM's head), so
``create_model(student, checkpoint="student.pt")`` loads it strictly.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..data.sa1b import Sa1bRecord, open_sa1b
from ..data.transforms import normalize_padded, resize_longest_padded
from ..errors import CheckpointError
from ..models import create_model, get_spec, save_weights
from ..models.checkpoints import describe_mismatch, read_state_dict, to_model_layout
from ..models.zoo import guess_model
from ..utils import distributed as dist_utils
from .config import ConfigError, DistillConfig, finalize, to_dict
from .embedding_cache import CachedEmbeddings, EmbeddingCache, collate_lookups, file_sha256, lookup
from .loop import (
    amp_dtype,
    apply_epochs,
    batch_stream,
    environment,
    init_device,
    prepare_output,
    run_config,
    train,
    write_summary,
)
from .losses import mse

log = logging.getLogger("evsam.distill")

# --teacher choices -> zoo models (train/config.py and cli/distill.py list the same names).
TEACHER_MODELS = {
    "vit_b": "sam-vit-b",
    "vit_l": "sam-vit-l",
    "vit_h": "sam-vit-h",
    "mobile_sam": "mobile-sam",
    "lite_medsam": "lite-medsam",
}


@dataclass(frozen=True)
class TeacherFrame:
    """How the teacher sees an image: its input side and its preprocessing."""

    size: int
    interpolation: str
    preprocessing: str


def teacher_frame(teacher: str) -> TeacherFrame:
    """The input frame of ``--teacher`` (read off its zoo model, built on the meta device)."""
    with torch.device("meta"):
        model = get_spec(TEACHER_MODELS[teacher]).build()
    return TeacherFrame(model.input_size, model.interpolation, model.preprocessing)


# ---------------------------------------------------------------------------- teacher
def read_teacher_head(teacher: str, checkpoint: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Check that ``checkpoint`` is a ``teacher`` file and return its prompt encoder + mask decoder.

    Only tensor names and shapes are compared (the file is memory-mapped), so a wrong file fails
    in a second, before any training starts. Raises ``CheckpointError`` naming the file, the
    teacher, the first mismatching keys and, when recognisable, the teacher the file is for.
    """
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise CheckpointError(f"teacher checkpoint not found: {path}")
    state, _ = read_state_dict(path, mmap=True)
    name = TEACHER_MODELS[teacher]
    with torch.device("meta"):
        model = get_spec(name).build()
    state = to_model_layout(model, state)
    problem = describe_mismatch(model, path, state)
    if problem is not None:
        found = guess_model(state)
        hint = ""
        by_model = {model: choice for choice, model in TEACHER_MODELS.items()}
        if found in by_model:
            hint = f"; it is a {found} checkpoint: use teacher {by_model[found]}"
        elif found:
            hint = f"; it is a {found} checkpoint, which is not a teacher model"
        raise CheckpointError(f"teacher_checkpoint does not fit teacher {teacher}: {problem}{hint}").naming(
            "teacher_checkpoint", "teacher"
        )
    return {k: v.clone() for k, v in state.items() if not k.startswith("image_encoder.")}


class Teacher:
    """The teacher's image encoder, frozen and in eval mode, built on first use (a warm cache never
    builds it)."""

    def __init__(self, teacher: str, checkpoint: str, device: torch.device, *, amp: bool) -> None:
        self.name = TEACHER_MODELS[teacher]
        self.frame = teacher_frame(teacher)
        self.checkpoint = checkpoint
        self.device = device
        self.dtype = amp_dtype(device, amp)
        self.forwards = 0  # images run through the teacher
        self._encoder: nn.Module | None = None

    @property
    def encoder(self) -> nn.Module:
        if self._encoder is None:
            log.info("loading teacher %s from %s", self.name, self.checkpoint)
            model = create_model(self.name, checkpoint=self.checkpoint, device=self.device)
            self._encoder = model.image_encoder.eval().requires_grad_(False)
        return self._encoder

    @torch.no_grad()
    def __call__(self, images: Tensor, sizes: Tensor) -> Tensor:
        """(M, 3, S, S) uint8 padded (S: the teacher's input size) + (M, 2) sizes -> (M, 256, 64, 64)
        embeddings, fp16-rounded.

        Rounded to float16 whether or not a cache stores them, so a cold and a warm run train on
        identical targets.
        """
        x = normalize_padded(images.to(self.device), sizes, self.frame.preprocessing)
        with torch.autocast(
            self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None
        ):
            out = self.encoder(x)
        self.forwards += len(x)
        return out.to(torch.float16)


# ---------------------------------------------------------------------------- data
@dataclass(frozen=True)
class DistillTransform:
    """Record -> student input, plus the cached teacher embedding or the teacher's input (``lookup``)."""

    student_size: int
    cache: EmbeddingCache | None
    teacher: TeacherFrame = TeacherFrame(1024, "bilinear", "sam")

    def __call__(self, record: Sa1bRecord, rng: np.random.Generator) -> dict[str, Any]:
        student, student_hw = resize_longest_padded(record.image, self.student_size)
        return {
            "image_id": record.image_id,
            "student": student,
            "student_hw": torch.tensor(student_hw),
            "lookup": lookup(self.cache, record.image, self.teacher.size, self.teacher.interpolation),
        }


def collate_distill(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack students; the teacher side goes through ``collate_lookups`` (hits and misses apart)."""
    return {
        "image_id": [s["image_id"] for s in samples],
        "student": torch.stack([s["student"] for s in samples]),
        "student_hw": torch.stack([s["student_hw"] for s in samples]),
        "lookup": collate_lookups([s["lookup"] for s in samples]),
    }


class DistillLoss:
    """``(student_encoder, batch) -> (MSE to the teacher embedding, cache statistics)``."""

    def __init__(self, targets: CachedEmbeddings, device: torch.device) -> None:
        self.targets = targets
        self.device = device

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        target = self.targets(batch["lookup"]).float()
        x = normalize_padded(batch["student"].to(self.device), batch["student_hw"])
        loss = mse(model(x), target)
        return loss, {
            "cache_hits": float(len(batch["lookup"]["hit_index"])),
            "cache_misses": float(len(batch["lookup"]["miss_index"])),
        }


class DistillValidation:
    """Mean MSE over the held-out slice, split across ranks; teacher targets kept in memory."""

    def __init__(self, records: list[Sa1bRecord], transform: DistillTransform, loss: DistillLoss) -> None:
        info = dist_utils.get_info()
        mine = [records[i] for i in dist_utils.shard_indices(len(records), info.rank, info.world_size)]
        self.samples = [transform(r, np.random.default_rng(0)) for r in mine]
        self.loss = loss
        self.targets: list[Tensor] = []
        self.total = len(records)

    def __call__(self, encoder: nn.Module) -> dict[str, float]:
        device = self.loss.device
        if not self.targets:
            for s in self.samples:
                batch = collate_distill([s])
                self.targets.append(self.loss.targets(batch["lookup"]).half().cpu())
        total = torch.zeros(2, dtype=torch.float64, device=device)
        for s, target in zip(self.samples, self.targets, strict=True):
            x = normalize_padded(s["student"][None].to(device), s["student_hw"][None])
            total[0] += float(mse(encoder(x), target.to(device)))
            total[1] += 1
        if dist_utils.get_info().distributed:
            torch.distributed.all_reduce(total)
        return {"val_mse": float(total[0] / total[1].clamp(min=1))}


# ---------------------------------------------------------------------------- entry point
def distill(
    config: DistillConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = False
) -> dict[str, Any]:
    """Run (or resume) a distillation; returns the summary also written to ``OUTPUT/summary.json``.

    Writes ``OUTPUT/metrics.jsonl``, ``OUTPUT/config.json``, ``OUTPUT/checkpoints/last.pt``,
    ``OUTPUT/student.pt`` (full model, loadable by ``create_model``) and ``OUTPUT/summary.json``.
    On resume the configuration saved in the checkpoint is used (only the output folder is taken
    from ``config``).
    """
    output = Path(config.loop.output)
    cfg = run_config(config, resume=resume)
    spec = get_spec(cfg.student)  # UnknownModelError lists the names
    if spec.family != "efficientvit-sam":
        raise ConfigError(
            f"student must name an EfficientViT-SAM variant (l0 ... xl1), not {spec.name}", "student"
        )
    image_size = cfg.image_size or spec.input_size
    head = read_teacher_head(cfg.teacher, cfg.teacher_checkpoint)
    source = open_sa1b(cfg.data.path, val_images=cfg.data.val_images)

    device, info = init_device(cfg.loop.device)
    if not resume:
        prepare_output(output, resume=False, overwrite=overwrite)
    output.mkdir(parents=True, exist_ok=True)

    cache = None
    if cfg.teacher_cache:
        digest = dist_utils.broadcast_object(file_sha256(cfg.teacher_checkpoint) if info.is_main else None)
        cache = EmbeddingCache(
            cfg.teacher_cache,
            encoder=cfg.teacher,
            weights_hash=digest,
            input_size=teacher_frame(cfg.teacher).size,
            dtype=torch.float16,
        )
        if info.is_main:
            cache.describe(checkpoint=str(cfg.teacher_checkpoint))
    if not resume:
        apply_epochs(cfg.loop, cfg.data, source, info.world_size)
        finalize(cfg, val_images=source.val_images)

    torch.manual_seed(cfg.loop.seed)  # same initial student on every rank
    student = create_model(spec.name, input_size=image_size, device=device)
    encoder = student.image_encoder.train()

    transform = DistillTransform(image_size, cache, teacher_frame(cfg.teacher))
    stream = batch_stream(
        source,
        transform=transform,
        collate=collate_distill,
        data=cfg.data,
        seed=cfg.loop.seed,
        info=info,
        device=device,
    )
    teacher = Teacher(cfg.teacher, cfg.teacher_checkpoint, device, amp=cfg.loop.amp)
    loss = DistillLoss(CachedEmbeddings(teacher, cache, device), device)
    val_records = [r for r in source.validation_records() if isinstance(r, Sa1bRecord)]
    validate = DistillValidation(val_records, transform, loss) if val_records else None

    def save_student(enc: nn.Module, path: Path) -> None:
        full = create_model(spec.name, input_size=image_size)
        full.image_encoder.load_state_dict(enc.state_dict())
        for part in ("prompt_encoder", "mask_decoder"):
            sub = {k[len(part) + 1 :]: v for k, v in head.items() if k.startswith(part + ".")}
            getattr(full, part).load_state_dict(sub, strict=True)
        save_weights(
            full,
            path,
            input_size=image_size,
            teacher=cfg.teacher,
            teacher_checkpoint=str(cfg.teacher_checkpoint),
            distilled=True,
        )

    config_dict = {"student": spec.name, **to_dict(cfg)}
    result = train(
        model=encoder,
        loss_fn=loss,
        stream=stream,
        loop=cfg.loop,
        optim=cfg.optim,
        device=device,
        config=config_dict,
        validate=validate,
        save_weights=save_student,
        weights_name="student.pt",
        resume=resume,
        progress=progress,
    )
    forwards = sum(dist_utils.all_gather_objects(teacher.forwards))
    summary = {
        "student": spec.name,
        "teacher": cfg.teacher,
        "teacher_checkpoint": str(cfg.teacher_checkpoint),
        "image_size": image_size,
        **result.totals(),
        "val_mse": result.validation.get("val_mse"),
        "val_images": len(val_records),
        "teacher_forwards": forwards,
        "teacher_cache": str(cache.folder) if cache is not None else None,
        "skipped_images": result.skipped_images,
        "student_weights": str(output / "student.pt"),
        **environment(),
    }
    write_summary(output, summary)
    return summary

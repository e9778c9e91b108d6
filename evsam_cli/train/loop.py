"""The training loop shared by ``evsam distill`` and ``evsam finetune``.

One function, ``train``, readable top to bottom like torchvision's ``train_one_epoch`` or
nanoGPT's ``train.py``: AdamW (no decay on norms and biases), linear warmup + cosine LR,
gradient accumulation, clipping, AMP on CUDA, DDP under ``torchrun``, a non-finite loss stops the
run with an error, ``metrics.jsonl`` (one JSON object per log event), atomic checkpoints every
``save_every`` steps and an exact ``--resume`` (model, optimizer, loss scaler, every rank's data
position and RNG state).

What is trained is decided by the caller: a module, a ``loss_fn(model, batch) -> (loss, metrics)``
(distillation is such a loss with a frozen teacher inside), a ``validate(model) -> metrics``
and a ``save_weights(model, path)`` for the final/best weight files. The setup both callers
share comes before it: ``run_config`` (what ``--resume`` continues with), ``init_device``,
``apply_epochs`` and ``batch_stream``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from ..data.sa1b import BatchStream, Collate, Sa1bStream, Transform, count_train_images
from ..errors import CheckpointError, EvsamError
from ..models.checkpoints import load_file
from ..utils import distributed as dist_utils
from ..utils.devices import resolve_device
from ..utils.io import atomic_path, write_json_atomic
from .config import DataConfig, DistillConfig, FinetuneConfig, LoopConfig, OptimConfig, from_dict

log = logging.getLogger("evsam.train")

LossFn = Callable[[nn.Module, dict[str, Any]], tuple[Tensor, dict[str, float]]]
Validate = Callable[[nn.Module], dict[str, float]]
SaveWeights = Callable[[nn.Module, Path], None]

RUN_FILES = ("metrics.jsonl", "config.json", "summary.json", "checkpoints")

RunConfig = TypeVar("RunConfig", DistillConfig, FinetuneConfig)


class TrainingError(EvsamError):
    """The run cannot go on (non-finite loss, nothing to resume, output folder in use ...)."""


# ---------------------------------------------------------------------------- output folder
def prepare_output(output: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder: an existing run needs ``resume`` or ``overwrite``."""
    last = output / "checkpoints" / "last.pt"
    if resume:
        if not last.is_file():
            raise TrainingError(f"nothing to resume in {output}: {last} does not exist")
        return
    holds_run = any((output / name).exists() for name in RUN_FILES)
    if holds_run and not overwrite:
        raise TrainingError(
            f"{output} already holds a training run; set resume to continue it or overwrite to replace it"
        ).naming("resume", "overwrite")
    if holds_run and dist_utils.is_main():
        for name in RUN_FILES:
            path = output / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    dist_utils.barrier()


# ---------------------------------------------------------------------------- run setup
def run_config(config: RunConfig, *, resume: bool) -> RunConfig:
    """``config``, or on resume the configuration saved in its output folder (only the output
    folder is taken from ``config``)."""
    if not resume:
        return config
    output = Path(config.loop.output)
    prepare_output(output, resume=True, overwrite=False)
    saved = from_dict(type(config), saved_config(output))
    saved.loop.output = str(output)
    return saved


def init_device(name: str) -> tuple[torch.device, dist_utils.DistInfo]:
    """Resolve ``--device`` and join torchrun's process group; on CUDA each rank takes its LOCAL_RANK GPU."""
    device = resolve_device(name)
    info = dist_utils.init_distributed(device)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    return device, info


def apply_epochs(loop: LoopConfig, data: DataConfig, source: Any, world_size: int) -> None:
    """With ``--epochs``, set ``loop.steps`` to that many passes over ``source``'s training images."""
    if loop.epochs:
        images = count_train_images(source)
        loop.steps = steps_for_epochs(loop.epochs, images, data.batch_size, loop.grad_accum, world_size)


def batch_stream(
    source: Any,
    *,
    transform: Transform,
    collate: Collate,
    data: DataConfig,
    seed: int,
    info: dist_utils.DistInfo,
    device: torch.device,
) -> BatchStream:
    """This rank's shard of ``source`` as endless, resumable training batches."""
    dataset = Sa1bStream(
        source,
        transform=transform,
        collate=collate,
        batch_size=data.batch_size,
        seed=seed,
        rank=info.rank,
        world_size=info.world_size,
        num_workers=data.worker_count(),
    )
    return BatchStream(dataset, num_workers=data.worker_count(), pin_memory=device.type == "cuda")


# ---------------------------------------------------------------------------- optimisation
def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW; parameters with fewer than 2 dimensions (norm scales, biases) get no weight decay."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def lr_at(step: int, total: int, cfg: OptimConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from ``lr`` down to ``min_lr_ratio * lr``."""
    warmup = cfg.warmup_for(total)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain numbers (what ``weights_only=True`` reads back)."""
    version, mt_state, gauss_next = random.getstate()
    bit_generator, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {
        "python": {
            "version": version,
            "state": torch.tensor(mt_state, dtype=torch.int64),
            "gauss": gauss_next,
        },
        "numpy": {
            "bit_generator": bit_generator,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["bit_generator"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 on GPUs that have it, else fp16; None (full fp32) on CPU or when disabled."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# ---------------------------------------------------------------------------- logging
class MetricsLog:
    """``metrics.jsonl`` on the main rank: one JSON object per line, flushed as written."""

    def __init__(self, path: Path, *, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Drop records logged after ``step`` (a killed run may have logged past its checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the kill
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(k + "\n" for k in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


@dataclass
class _Window:
    """Sums over the steps since the last log event."""

    steps: int = 0
    loss: float = 0.0
    data_wait: float = 0.0
    seconds: float = 0.0
    images: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    def add(
        self, loss: float, data_wait: float, seconds: float, images: int, extra: dict[str, float]
    ) -> None:
        self.steps += 1
        self.loss += loss
        self.data_wait += data_wait
        self.seconds += seconds
        self.images += images
        for k, v in extra.items():
            self.extra[k] = self.extra.get(k, 0.0) + v


# ---------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write to a temporary file in the same folder, then rename: a kill never leaves half a file."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint_file(path: Path) -> dict[str, Any]:
    """A training checkpoint, read with the safe loader like every other file (it holds only
    tensors, numbers, strings and containers: see ``_rng_state``)."""
    ckpt = load_file(path, what="training checkpoint")
    meta = ckpt.get("evsam") if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != "evsam-train-checkpoint":
        raise CheckpointError(f"{path} is not an evsam training checkpoint")
    return ckpt


# ---------------------------------------------------------------------------- the loop
@dataclass
class TrainResult:
    steps: int
    epochs: int
    images: int
    seconds: float
    final_loss: float | None
    validation: dict[str, float]
    best: dict[str, float] | None
    skipped_images: list[str]

    def totals(self) -> dict[str, Any]:
        """Length, throughput and last loss of the run (the part of summary.json every run shares)."""
        return {
            "steps": self.steps,
            "epochs": self.epochs,
            "images": self.images,
            "seconds": self.seconds,
            "images_per_s": self.images / max(self.seconds, 1e-9),
            "final_loss": self.final_loss,
        }


def train(
    *,
    model: nn.Module,
    loss_fn: LossFn,
    stream: BatchStream,
    loop: LoopConfig,
    optim: OptimConfig,
    device: torch.device,
    config: dict[str, Any],
    validate: Validate | None = None,
    best_metric: tuple[str, str] | None = None,
    save_weights: SaveWeights | None = None,
    weights_name: str = "model.pt",
    best_name: str | None = None,
    resume: bool = False,
    progress: bool = False,
    find_unused_parameters: bool = False,
) -> TrainResult:
    """Train ``model`` for ``loop.steps`` optimizer steps (each ``loop.grad_accum`` micro-batches).

    Args:
      model: the module being trained, on ``device`` (wrapped in DDP here when distributed).
      loss_fn: ``(model, batch) -> (scalar loss, {name: float})``; the floats are averaged over
        the log window and written to metrics.jsonl (e.g. cache hits, per-term losses).
      stream: this rank's batches (``BatchStream``); its position is checkpointed.
      config: the run's configuration, stored in checkpoints.
      validate: ``model -> {name: float}``, run at step 0, every ``val_every`` steps and at the end.
      best_metric: (name, "max"|"min"): keep ``best_name`` with the best validation value.
      save_weights: writes the unwrapped model to a weights file (final and best).
      resume: continue from ``OUTPUT/checkpoints/last.pt``.
      progress: show a progress bar on rank 0.
      find_unused_parameters: DDP option, for models where some trainable parameters take no
        part in a given loss (e.g. SAM's mask-input path when no mask prompt is given).

    Each batch gets ``batch["step"]``, the 0-based optimizer step it contributes to, so a loss can
    alternate behaviour by step and still resume exactly.
    """
    info = dist_utils.get_info()
    output = Path(loop.output)
    ckpt_path = output / "checkpoints" / "last.pt"
    metrics = MetricsLog(output / "metrics.jsonl", enabled=info.is_main)

    seed_everything(loop.seed + info.rank)
    optimizer = build_optimizer(model, optim)
    dtype = amp_dtype(device, loop.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    step, best, last_val = 0, None, {}

    if resume:
        ckpt = load_checkpoint_file(ckpt_path)
        if ckpt["world_size"] != info.world_size:
            raise TrainingError(
                f"{ckpt_path} was written by {ckpt['world_size']} processes; resume it with the same number "
                f"(torchrun --nproc-per-node {ckpt['world_size']}), not {info.world_size}"
            )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        stream.load_state_dict(ckpt["data"][info.rank])
        _set_rng_state(ckpt["rng"][info.rank])
        step, best, last_val = ckpt["step"], ckpt.get("best"), ckpt.get("validation", {})
        metrics.truncate_after(step)
        log.info("resumed from %s at step %d", ckpt_path, step)
    elif info.is_main:
        write_json_atomic(output / "config.json", config)

    model_without_ddp = model
    if info.distributed:
        model = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
        )

    def checkpoint() -> None:
        data_states = dist_utils.all_gather_objects(stream.state_dict())
        rng_states = dist_utils.all_gather_objects(_rng_state())
        if info.is_main:
            state = {
                "model": model_without_ddp.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "step": step,
                "config": config,
                "data": data_states,
                "rng": rng_states,
                "best": best,
                "validation": last_val,
                "world_size": info.world_size,
                "evsam": {
                    "format": "evsam-train-checkpoint",
                    "model": config.get("model", config.get("student")),
                },
            }
            save_checkpoint(ckpt_path, state)
        dist_utils.barrier()

    def run_validation() -> dict[str, float]:
        nonlocal best
        if validate is None:
            return {}
        model_without_ddp.eval()
        with (
            torch.no_grad(),
            torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None),
        ):
            values = validate(model_without_ddp)
        model_without_ddp.train()
        metrics.write({"step": step, **values})
        if best_metric is not None and best_name and save_weights is not None:
            name, mode = best_metric
            value = values[name]
            better = best is None or (value > best[name] if mode == "max" else value < best[name])
            if better:
                best = {"step": step, name: value}
                if info.is_main:
                    save_weights(model_without_ddp, output / best_name)
        log.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
        return values

    model.train()
    if step == 0 and validate is not None:
        last_val = run_validation()

    bar = None
    if progress and info.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=loop.steps, initial=step, desc="train", unit="step", dynamic_ncols=True)

    window = _Window()
    start = time.perf_counter()
    final_loss = None
    images_before = stream.images
    while step < loop.steps:
        t_step = time.perf_counter()
        lr = lr_at(step, loop.steps, optim)
        for group in optimizer.param_groups:
            group["lr"] = lr
        data_wait, step_loss, step_images = 0.0, 0.0, 0
        extra: dict[str, float] = {}
        for micro in range(loop.grad_accum):
            t_data = time.perf_counter()
            batch = next(stream)
            data_wait += time.perf_counter() - t_data
            step_images += len(batch["image_id"])
            batch["step"] = step
            sync = micro == loop.grad_accum - 1 or not info.distributed
            with nullcontext() if sync else model.no_sync():  # type: ignore[operator]  # DDP when not sync
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    loss, parts = loss_fn(model, batch)
                _check_finite(loss, step, info.distributed)
                scaler.scale(loss / loop.grad_accum).backward()
            step_loss += float(loss.detach()) / loop.grad_accum
            for k, v in parts.items():
                extra[k] = extra.get(k, 0.0) + v
        if optim.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model_without_ddp.parameters(), optim.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window.add(step_loss, data_wait, time.perf_counter() - t_step, step_images, extra)
        final_loss = step_loss

        if step % loop.log_every == 0 or step == loop.steps:
            record = _log_record(window, step, stream.epoch, lr, device)
            metrics.write(record)
            if bar is not None:
                bar.set_postfix(loss=f"{record['loss']:.4g}", wait=f"{record['data_wait_s']:.3f}s")
            window = _Window()
        if validate is not None and loop.val_every and step % loop.val_every == 0 and step < loop.steps:
            last_val = run_validation()
        if step % loop.save_every == 0 or step == loop.steps:
            if step == loop.steps and validate is not None:
                last_val = run_validation()
            checkpoint()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    if info.is_main and save_weights is not None:
        save_weights(model_without_ddp, output / weights_name)
    dist_utils.barrier()
    seconds = time.perf_counter() - start
    all_skipped = sorted({s for names in dist_utils.all_gather_objects(stream.skipped) for s in names})
    images = sum(dist_utils.all_gather_objects(stream.images - images_before))
    return TrainResult(
        steps=step,
        epochs=stream.epoch,
        images=images,
        seconds=seconds,
        final_loss=final_loss,
        validation=last_val,
        best=best,
        skipped_images=all_skipped,
    )


def _check_finite(loss: Tensor, step: int, distributed: bool) -> None:
    """Every rank stops together when any rank's loss is NaN/inf (a lone raise would hang the others)."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    if distributed:
        torch.distributed.all_reduce(bad)
    if bad.item() > 0:
        raise TrainingError(
            f"the loss became non-finite ({float(loss.detach())}) at step {step + 1}; "
            "lower lr, raise warmup_steps or check the data (the last checkpoint is intact)"
        ).naming("lr", "warmup_steps")


def _log_record(window: _Window, step: int, epoch: int, lr: float, device: torch.device) -> dict[str, Any]:
    """Averages over the window, reduced across ranks (images/s summed over ranks)."""
    n = max(1, window.steps)
    values = {"loss": window.loss / n, "data_wait_s": window.data_wait / n, "step_s": window.seconds / n}
    values.update({k: v / n for k, v in window.extra.items()})
    values = dist_utils.reduce_mean(values, device=device if device.type == "cuda" else None)
    world = dist_utils.get_info().world_size
    images_per_s = world * window.images / max(window.seconds, 1e-9)
    return {"step": step, "epoch": epoch, "lr": lr, **values, "images_per_s": images_per_s}


def steps_for_epochs(epochs: float, images: int, batch_size: int, grad_accum: int, world_size: int) -> int:
    """Optimizer steps for ``epochs`` passes over ``images`` at the global batch size."""
    per_step = batch_size * grad_accum * world_size
    return max(1, math.ceil(epochs * images / per_step))


def saved_config(output: Path) -> dict[str, Any]:
    """The configuration stored in ``OUTPUT/checkpoints/last.pt`` (what ``--resume`` continues with)."""
    return load_checkpoint_file(output / "checkpoints" / "last.pt")["config"]


def write_summary(output: Path, summary: dict[str, Any]) -> None:
    if dist_utils.is_main():
        write_json_atomic(output / "summary.json", summary)


def environment() -> dict[str, Any]:
    """Where the run happened (for summary.json)."""
    info = dist_utils.get_info()
    return {"world_size": info.world_size, "pid": os.getpid(), "torch": torch.__version__}

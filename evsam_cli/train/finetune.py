"""End-to-end training of EfficientViT-SAM (image encoder, prompt encoder and mask decoder).

The objective follows the paper (and SAM): for every image, ``masks_per_image`` of its masks are
sampled (repeated when it has fewer) and each is prompted by its tight box or by 1-10 random
points inside it (box or points chosen per image, 1/2 each). Mask logits are upsampled to the
encoder input size and trained with ``20 x focal + 1 x dice`` against the resized, padded ground
truth. Every other optimizer step decodes three masks per prompt (multimask output) and only
the lowest-loss one is trained, as SAM does for ambiguous prompts. The IoU head learns the IoU
of the trained mask (MSE, as in SAM) so that its scores stay meaningful. Images are flipped
horizontally at random and resized (longest side) and padded like at inference.

Validation: mean box-prompt IoU (percent) of single-mask predictions, at the original image
resolution, over every mask of the held-out images.

With ``freeze_encoder`` the image encoder is frozen (no gradients, eval mode, saved unchanged)
and only the prompt encoder and mask decoder train. Its embeddings then depend on the image
alone, so they go through an ``EmbeddingCache``: a first pass encodes every image this rank
trains on (``fill_cache``), and every step after that costs the decoder only. The random flip is
off in this mode: a flipped image has another embedding, and flipping the embedding instead is
not exact (the encoder is not mirror-symmetric and pads at the bottom/right).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..accel.streaming import decode_prompts
from ..data.coco_train import open_coco
from ..data.sa1b import Sa1bRecord, Sa1bStream, collate_stack, count_train_images, decode_mask, open_sa1b
from ..data.transforms import normalize_padded, resize_longest_padded, resize_mask_padded
from ..errors import CheckpointError
from ..models import Sam, create_model, get_spec, read_state_dict, save_weights
from ..utils import distributed as dist_utils
from .config import ConfigError, FinetuneConfig, finalize, to_dict
from .embedding_cache import (
    CachedEmbeddings,
    EmbeddingCache,
    collate_lookups,
    image_key,
    lookup,
    weights_sha256,
)
from .loop import (
    amp_dtype,
    apply_epochs,
    batch_stream,
    environment,
    init_device,
    load_checkpoint_file,
    prepare_output,
    run_config,
    train,
    write_summary,
)
from .losses import mask_iou, min_over_outputs, upsampled_mask_losses
from .prompts import mask_box, sample_points, to_prompt_frame

log = logging.getLogger("evsam.finetune")


# ---------------------------------------------------------------------------- data
@dataclass(frozen=True)
class FinetuneTransform:
    """Record -> image, K ground-truth masks in the input frame and their prompts (prompt frame).

    With ``embed`` (a frozen encoder) the image is replaced by ``lookup``: its cached embedding,
    or the encoder input when it is not cached yet; the flip is then never applied.
    """

    input_size: int
    masks_per_image: int
    prompt_size: int = 1024
    flip: bool = True
    embed: bool = False
    cache: EmbeddingCache | None = None
    interpolation: str = "bilinear"  # the model's resize (``Sam.interpolation``)

    def __call__(self, record: Sa1bRecord, rng: np.random.Generator) -> dict[str, Any] | None:
        image = record.image
        h, w = image.shape[:2]
        anns = [a for a in record.annotations if "segmentation" in a]
        masks: dict[int, np.ndarray] = {}
        for i in rng.permutation(len(anns)):
            m = decode_mask(anns[i]["segmentation"], h, w)
            if m.shape == (h, w) and m.any():
                masks[int(i)] = m
            if len(masks) == self.masks_per_image:
                break
        if not masks:
            return None  # an image without usable masks is skipped, not a crash
        chosen = list(masks.values())
        chosen = [chosen[k % len(chosen)] for k in range(self.masks_per_image)]  # repeat when fewer
        if self.flip and not self.embed and rng.random() < 0.5:
            image = image[:, ::-1]
            chosen = [m[:, ::-1] for m in chosen]
        if self.embed:
            pixels: dict[str, Any] = {
                "lookup": lookup(self.cache, image, self.input_size, self.interpolation)
            }
        else:
            resized, hw = resize_longest_padded(
                np.ascontiguousarray(image), self.input_size, self.interpolation
            )
            pixels = {"image": resized, "image_hw": torch.tensor(hw)}
        boxes = np.stack([mask_box(m) for m in chosen])
        points = [sample_points(m, rng) for m in chosen]
        return {
            "image_id": record.image_id,
            **pixels,
            "masks": torch.stack([resize_mask_padded(m, self.input_size) for m in chosen]).bool(),
            "boxes": torch.from_numpy(to_prompt_frame(boxes, (h, w), self.prompt_size)),
            "points": torch.from_numpy(
                to_prompt_frame(np.stack([p for p, _ in points]), (h, w), self.prompt_size)
            ),
            "point_labels": torch.from_numpy(np.stack([lab for _, lab in points])),
            "use_box": torch.tensor(bool(rng.random() < 0.5)),
        }


def collate_finetune(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """``collate_stack``, with the lookups of a frozen-encoder run batched by ``collate_lookups``."""
    batch = collate_stack([{k: v for k, v in s.items() if k != "lookup"} for s in samples])
    if "lookup" in samples[0]:
        batch["lookup"] = collate_lookups([s["lookup"] for s in samples])
    return batch


# ---------------------------------------------------------------------------- model and loss
class PromptedSam(nn.Module):
    """The trained module: encoder on a batch of images, decoder on each image's K prompts.

    With ``freeze_bn`` the encoder's BatchNorm layers stay in eval mode while training: they
    normalise with their stored statistics and do not update them (usual when finetuning with
    a few images per GPU, and what makes validation match training from the first steps).
    With ``freeze_encoder`` the whole image encoder stays in eval mode without gradients, and
    ``forward`` takes its embeddings instead of images.
    """

    def __init__(self, sam: Sam, *, freeze_bn: bool = False, freeze_encoder: bool = False) -> None:
        super().__init__()
        self.sam = sam
        self.freeze_bn = freeze_bn
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            sam.image_encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> PromptedSam:
        super().train(mode)
        if self.freeze_encoder:
            self.sam.image_encoder.eval()
        if self.freeze_bn:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def forward(
        self,
        inputs: Tensor,
        boxes: Tensor,
        points: Tensor,
        point_labels: Tensor,
        use_box: Tensor,
        multimask: bool,
    ) -> tuple[Tensor, Tensor]:
        """
        Args:
          inputs: (B, 3, S, S) normalised, padded images; with ``freeze_encoder`` their
            (B, 256, 64, 64) image embeddings instead.
          boxes: (B, K, 4) xyxy; points: (B, K, P, 2) x,y; point_labels: (B, K, P) (1 or -1 padding),
            all in the prompt frame; use_box: (B,) bool, box or points for each image.
          multimask: three outputs per prompt instead of one.
        Returns: (B, K, M, 256, 256) mask logits and (B, K, M) predicted IoUs (M = 3 or 1).
        """
        embeddings = inputs if self.freeze_encoder else self.sam.image_encoder(inputs)
        logits, ious = [], []
        for b in range(len(inputs)):
            if bool(use_box[b]):
                out = decode_prompts(
                    self.sam, embeddings[b : b + 1], boxes=boxes[b], multimask_output=multimask
                )
            else:
                out = decode_prompts(
                    self.sam,
                    embeddings[b : b + 1],
                    point_coords=points[b],
                    point_labels=point_labels[b],
                    multimask_output=multimask,
                )
            logits.append(out[0])
            ious.append(out[1])
        return torch.stack(logits), torch.stack(ious)


class FrozenEncoder:
    """``(pixels, hw) -> embeddings`` of a frozen image encoder, in the run's precision (autocast
    dtype on CUDA with AMP, else float32), whether called in a step, a validation or ``fill_cache``."""

    def __init__(
        self, encoder: nn.Module, device: torch.device, dtype: torch.dtype | None, preprocessing: str = "sam"
    ) -> None:
        self.encoder = encoder
        self.device = device
        self.dtype = dtype
        self.preprocessing = preprocessing

    @torch.no_grad()
    def __call__(self, pixels: Tensor, hw: Tensor) -> Tensor:
        x = normalize_padded(pixels.to(self.device), hw, self.preprocessing)
        with torch.autocast(
            self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None
        ):
            out = self.encoder(x)
        return out.to(self.dtype or torch.float32)


class FinetuneLoss:
    """``(PromptedSam, batch) -> (focal/dice loss of the best output + IoU-head MSE, parts)``.

    ``embed`` (frozen encoder): the batch's embeddings come from it (the cache, misses encoded).
    """

    def __init__(
        self,
        device: torch.device,
        *,
        focal_weight: float,
        dice_weight: float,
        embed: CachedEmbeddings | None = None,
        preprocessing: str = "sam",
    ) -> None:
        self.device = device
        self.preprocessing = preprocessing
        self.focal_weight = focal_weight
        self.dice_weight = dice_weight
        self.embed = embed
        self.calls = 0  # micro-batches this process trained on (for steps/s)

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        multimask = batch.get("step", 0) % 2 == 1
        d = self.device
        self.calls += 1
        cache_parts = {}
        if "lookup" in batch:
            x = self.embed(batch["lookup"])  # type: ignore[misc]
            cache_parts = {
                "cache_hits": float(len(batch["lookup"]["hit_index"])),
                "cache_misses": float(len(batch["lookup"]["miss_index"])),
            }
        else:
            x = normalize_padded(batch["image"].to(d), batch["image_hw"], self.preprocessing)
        logits, iou_pred = model(
            x,
            batch["boxes"].to(d),
            batch["points"].to(d),
            batch["point_labels"].to(d),
            batch["use_box"],
            multimask,
        )
        # Upsampled to the masks' size inside, a few masks at a time (``upsampled_mask_losses``).
        focal, dice, all_iou = upsampled_mask_losses(logits.flatten(0, 1), batch["masks"].to(d).flatten(0, 1))
        per_output = self.focal_weight * focal + self.dice_weight * dice  # (B*K, M)
        best, index = min_over_outputs(per_output)
        rows = torch.arange(len(index), device=d)
        true_iou = all_iou[rows, index]
        iou_loss = F.mse_loss(iou_pred.flatten(0, 1)[rows, index].float(), true_iou)
        loss = best.mean() + iou_loss
        return loss, {
            "focal": float(focal[rows, index].detach().mean()),
            "dice": float(dice[rows, index].detach().mean()),
            "iou_loss": float(iou_loss.detach()),
            "train_iou": float(true_iou.mean() * 100),
            "multimask": float(multimask),
            **cache_parts,
        }


class BoxValidation:
    """Mean box-prompt IoU (percent) over every mask of the held-out images, split across ranks.

    ``embed`` (frozen encoder): embeddings come from it instead of the model's encoder.
    """

    def __init__(
        self, records: list[Sa1bRecord], device: torch.device, embed: CachedEmbeddings | None = None
    ) -> None:
        info = dist_utils.get_info()
        self.records = [
            records[i] for i in dist_utils.shard_indices(len(records), info.rank, info.world_size)
        ]
        self.device = device
        self.embed = embed
        self.masks = [
            [m for a in r.annotations if (m := decode_mask(a["segmentation"], *r.image.shape[:2])).any()]
            for r in self.records
        ]

    def __call__(self, model: nn.Module) -> dict[str, float]:
        sam = cast(Sam, model.sam)
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for record, masks in zip(self.records, self.masks, strict=True):
            if not masks:
                continue
            hw = record.image.shape[:2]
            if self.embed is not None:
                cache = self.embed.cache
                embedding = self.embed(
                    collate_lookups([lookup(cache, record.image, sam.input_size, sam.interpolation)])
                )
            else:
                pixels, resized = resize_longest_padded(record.image, sam.input_size, sam.interpolation)
                x = normalize_padded(pixels[None].to(self.device), torch.tensor([resized]), sam.preprocessing)
                embedding = sam.image_encoder(x)
            boxes = to_prompt_frame(np.stack([mask_box(m) for m in masks]), hw, sam.prompt_size)
            low, _ = decode_prompts(
                sam, embedding, boxes=torch.from_numpy(boxes).to(self.device), multimask_output=False
            )
            pred = sam.postprocess_masks(low.float(), sam.prompt_frame_size(hw), hw)[:, 0]
            gt = torch.from_numpy(np.stack(masks)).to(self.device)
            iou = mask_iou(pred, gt)
            total[0] += iou.sum().double()
            total[1] += len(iou)
        if dist_utils.get_info().distributed:
            torch.distributed.all_reduce(total)
        return {"val_iou": float(100 * total[0] / total[1].clamp(min=1))}


# ---------------------------------------------------------------------------- cache fill
@dataclass(frozen=True)
class _FillTransform:
    """Record -> its key, plus the encoder input when it is not cached yet."""

    cache: EmbeddingCache
    input_size: int
    interpolation: str = "bilinear"

    def __call__(self, record: Sa1bRecord, rng: np.random.Generator) -> dict[str, Any]:
        key = image_key(record.image)
        if self.cache.path(key).is_file():
            return {"key": key, "pixels": None}
        pixels, hw = resize_longest_padded(record.image, self.input_size, self.interpolation)
        return {"key": key, "pixels": pixels, "hw": torch.tensor(hw)}


def _collate_fill(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The misses of a fill batch, shaped like ``collate_lookups`` (no hits: nothing is read)."""
    miss = [s for s in samples if s["pixels"] is not None]
    return {
        "images": len(samples),
        "keys": [s["key"] for s in miss],
        "hit_index": [],
        "embeddings": None,
        "miss_index": list(range(len(miss))),
        "pixels": torch.stack([s["pixels"] for s in miss]) if miss else None,
        "hw": torch.stack([s["hw"] for s in miss]) if miss else None,
    }


def fill_cache(
    source: Any,
    embed: CachedEmbeddings,
    *,
    input_size: int,
    batch_size: int,
    workers: int,
    progress: bool,
    interpolation: str = "bilinear",
) -> None:
    """Encode every training image of this rank's share that the cache lacks (one pass, in file
    order, with a progress bar on rank 0); then every rank waits for the others."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    assert embed.cache is not None
    info = dist_utils.get_info()
    stream = Sa1bStream(
        source,
        transform=_FillTransform(embed.cache, input_size, interpolation),
        collate=_collate_fill,
        batch_size=batch_size,
        seed=0,
        rank=info.rank,
        world_size=info.world_size,
        num_workers=workers,
        shuffle=False,
    )
    total = math.ceil(count_train_images(source) / info.world_size)
    bar = tqdm(total=total, desc="embedding cache", unit="image", disable=not (progress and info.is_main))
    for batch in DataLoader(stream, batch_size=None, num_workers=workers):
        if batch["_empty"]:
            continue
        if batch["miss_index"]:
            embed(batch)
        embed.hits += batch["images"] - len(batch["miss_index"])
        bar.update(batch["images"])
    bar.close()
    dist_utils.barrier()


# ---------------------------------------------------------------------------- entry point
def load_sam_head(model: Sam, checkpoint: str | Path) -> None:
    """Copy SAM's prompt encoder and mask decoder from a Meta ``sam_vit_*.pth`` file (strictly)."""
    state, _ = read_state_dict(checkpoint)
    for part in ("prompt_encoder", "mask_decoder"):
        sub = {k[len(part) + 1 :]: v for k, v in state.items() if k.startswith(part + ".")}
        try:
            getattr(model, part).load_state_dict(sub, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0:2]
            raise CheckpointError(f"{checkpoint} has no usable SAM {part}: {' '.join(first)}") from None


def build_model(cfg: FinetuneConfig, image_size: int) -> Sam:
    spec = get_spec(cfg.model)
    if image_size != spec.input_size and spec.family != "efficientvit-sam":
        raise ConfigError(f"{spec.name} only runs at image_size {spec.input_size}", "image_size")
    if cfg.init:
        return create_model(spec.name, checkpoint=cfg.init, input_size=image_size)
    model = create_model(spec.name, input_size=image_size)
    if cfg.sam_head_checkpoint:
        load_sam_head(model, cfg.sam_head_checkpoint)
    else:
        log.warning("no init and no sam_head_checkpoint: the whole model starts from random weights")
    return model


def finetune(
    config: FinetuneConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = False
) -> dict[str, Any]:
    """Run (or resume) end-to-end training; returns the summary written to ``OUTPUT/summary.json``.

    Writes ``metrics.jsonl`` (step, loss, ...; val_iou in percent at validations), ``config.json``,
    ``checkpoints/last.pt``, ``model.pt`` (last weights), ``model_best.pt`` (best val_iou) and
    ``summary.json``. ``data.path`` is an SA-1B folder/shards, or the image folder of a COCO-format
    dataset when ``annotations`` is given.
    """
    output = Path(config.loop.output)
    cfg = run_config(config, resume=resume)
    spec = get_spec(cfg.model)
    image_size = cfg.image_size or spec.input_size
    if cfg.annotations:
        source: Any = open_coco(cfg.data.path, cfg.annotations, val_images=cfg.data.val_images)
    else:
        source = open_sa1b(cfg.data.path, val_images=cfg.data.val_images)

    device, info = init_device(cfg.loop.device)
    torch.manual_seed(cfg.loop.seed)
    # A bad --init fails before the output folder is touched. On resume the weights come from
    # the checkpoint (and the --init file may be gone by now).
    sam = create_model(spec.name, input_size=image_size) if resume else build_model(cfg, image_size)
    if not resume:
        prepare_output(output, resume=False, overwrite=overwrite)
    output.mkdir(parents=True, exist_ok=True)
    if not resume:
        apply_epochs(cfg.loop, cfg.data, source, info.world_size)
        finalize(cfg, val_images=source.val_images)

    model = PromptedSam(sam, freeze_bn=cfg.freeze_bn, freeze_encoder=cfg.freeze_encoder).to(device).train()
    embed, cache = None, None
    if cfg.freeze_encoder:
        if resume:  # the cache key is the hash of the weights the run trains with: load them first
            model.load_state_dict(load_checkpoint_file(output / "checkpoints" / "last.pt")["model"])
        dtype = amp_dtype(device, cfg.loop.amp)
        digest = weights_sha256(sam.image_encoder.state_dict()) if info.is_main else None
        cache = EmbeddingCache(
            cfg.embedding_cache or output / "embedding_cache",
            encoder=spec.name,
            weights_hash=dist_utils.broadcast_object(digest),
            input_size=image_size,
            dtype=dtype or torch.float32,
        )
        if info.is_main:
            cache.describe(init=cfg.init)
        embed = CachedEmbeddings(
            FrozenEncoder(sam.image_encoder, device, dtype, sam.preprocessing), cache, device
        )
        fill_cache(
            source,
            embed,
            input_size=image_size,
            interpolation=sam.interpolation,
            batch_size=cfg.data.batch_size,
            workers=cfg.data.worker_count(),
            progress=progress,
        )
    stream = batch_stream(
        source,
        transform=FinetuneTransform(
            image_size,
            cfg.masks_per_image,
            prompt_size=sam.prompt_size,
            embed=cfg.freeze_encoder,
            cache=cache,
            interpolation=sam.interpolation,
        ),
        collate=collate_finetune,
        data=cfg.data,
        seed=cfg.loop.seed,
        info=info,
        device=device,
    )
    val_records = [r for r in source.validation_records() if isinstance(r, Sa1bRecord)]
    validate = BoxValidation(val_records, device, embed) if val_records else None
    loss = FinetuneLoss(
        device,
        focal_weight=cfg.focal_weight,
        dice_weight=cfg.dice_weight,
        embed=embed,
        preprocessing=sam.preprocessing,
    )

    def save_model(m: nn.Module, path: Path) -> None:
        save_weights(cast(Sam, m.sam), path, input_size=image_size, finetuned=True)

    result = train(
        model=model,
        loss_fn=loss,
        stream=stream,
        loop=cfg.loop,
        optim=cfg.optim,
        device=device,
        config={"model": spec.name, **to_dict(cfg)},
        validate=validate,
        best_metric=("val_iou", "max"),
        save_weights=save_model,
        weights_name="model.pt",
        best_name="model_best.pt",
        resume=resume,
        progress=progress,
        find_unused_parameters=True,
    )
    cache_stats = None
    if embed is not None:
        counts = dist_utils.all_gather_objects((embed.hits, embed.misses))
        hits, misses = sum(h for h, _ in counts), sum(m for _, m in counts)
        assert embed.cache is not None
        cache_stats = {"folder": str(embed.cache.folder), "hits": hits, "misses": misses}
    summary = {
        "model": spec.name,
        "init": cfg.init,
        "image_size": image_size,
        "data": cfg.data.path,
        "annotations": cfg.annotations,
        "freeze_encoder": cfg.freeze_encoder,
        **result.totals(),
        "steps_per_s": loss.calls / cfg.loop.grad_accum / max(result.seconds, 1e-9),
        "embedding_cache": cache_stats,  # lookups of this run (all ranks); misses = images encoded
        "val_iou": result.validation.get("val_iou"),
        "best": result.best,
        "val_images": len(val_records),
        "skipped_images": result.skipped_images,
        "weights": str(output / "model.pt"),
        "best_weights": str(output / "model_best.pt") if result.best else None,
        **environment(),
    }
    write_summary(output, summary)
    return summary

"""Automatic mask generation ("segment everything") with segment-anything's semantics.

``AutomaticMaskGenerator`` prompts the model with a regular grid of points (per image crop),
keeps the masks that pass the predicted-IoU and stability thresholds, removes duplicates with
box NMS and returns SA-1B-style records. The results are those of the official generator for
the same weights and settings (up to float rounding in the decoder, ~1e-6 relative); the work
is ordered so that little of it is done at full resolution, without changing any result:

1. Decoding goes through the predictor's decode backend (``accel/backend.py``; on CPU the
   streamed decoder), in two halves: the two-way transformer gives every prompt's IoU
   predictions (``decode_tokens``); the mask head (output upscaling + hypernetwork product)
   then runs only for the prompts with at least one mask above ``pred_iou_thresh``, and only
   for those masks (``mask_logits``).
2. Only masks passing the IoU filter are upscaled to full resolution (in bounded chunks), where
   the stability score is computed on the upscaled logits exactly as the official generator
   does, and boxes are taken.
3. Surviving masks are kept cropped to their box; box NMS runs on the boxes, and only the masks
   NMS keeps are ever assembled at full size or run-length encoded.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import batched_nms

from ..data.images import to_rgb_uint8
from ..models.sam import Sam
from .amg_settings import OUTPUT_MODES, AmgConfigError, AmgSettings
from .amg_utils import (
    box_near_crop_edge,
    generate_crop_boxes,
    mask_to_box,
    mask_to_coco_rle,
    mask_to_rle,
    masks_to_boxes,
    remove_small_regions,
    stability_score,
    xyxy_to_xywh,
)
from .sam_predictor import SamPredictor

__all__ = ["OUTPUT_MODES", "AmgConfigError", "AmgSettings", "AutomaticMaskGenerator", "validate_settings"]

# Full-resolution logits upscaled at once are bounded to about this many float32 values (with
# the stability score's comparisons and the masks, a few times this in bytes).
_FULL_RES_BUDGET = 2**24


@dataclass
class _Candidates:
    """Masks kept so far, in the order the official generator would hold them.

    ``pieces[i]`` is mask i cropped to its box; ``offsets[i]`` the (row, col) of that piece in
    the frame the boxes are in.
    """

    boxes: list[Tensor] = field(default_factory=list)  # (K, 4) int64 inclusive xyxy
    iou: list[Tensor] = field(default_factory=list)  # (K,) float32
    stability: list[Tensor] = field(default_factory=list)  # (K,) float32
    points: list[np.ndarray] = field(default_factory=list)  # (K, 2) float64 x, y
    crop_boxes: list[list[int]] = field(default_factory=list)  # one xyxy per mask
    pieces: list[np.ndarray] = field(default_factory=list)
    offsets: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pieces)

    def box_tensor(self) -> Tensor:
        return torch.cat(self.boxes).cpu() if self.boxes else torch.zeros(0, 4, dtype=torch.int64)

    def compact(self) -> None:
        """Concatenate the per-batch tensors (after which each list holds one entry)."""
        if len(self.boxes) > 1:
            self.boxes = [torch.cat(self.boxes).cpu()]
            self.iou = [torch.cat(self.iou).cpu()]
            self.stability = [torch.cat(self.stability).cpu()]
            self.points = [np.concatenate(self.points)]

    def select(self, keep: Tensor) -> _Candidates:
        """The candidates at indices ``keep`` (a LongTensor), in that order."""
        self.compact()
        idx = keep.cpu().long()
        order = idx.tolist()
        return _Candidates(
            boxes=[self.boxes[0][idx]] if self.boxes else [],
            iou=[self.iou[0][idx]] if self.iou else [],
            stability=[self.stability[0][idx]] if self.stability else [],
            points=[self.points[0][idx.numpy()]] if self.points else [],
            crop_boxes=[self.crop_boxes[i] for i in order],
            pieces=[self.pieces[i] for i in order],
            offsets=[self.offsets[i] for i in order],
        )

    def extend(self, other: _Candidates) -> None:
        for name in ("boxes", "iou", "stability", "points", "crop_boxes", "pieces", "offsets"):
            getattr(self, name).extend(getattr(other, name))

    def full_mask(self, i: int, size: tuple[int, int]) -> np.ndarray:
        mask = np.zeros(size, dtype=bool)
        r, c = self.offsets[i]
        piece = self.pieces[i]
        mask[r : r + piece.shape[0], c : c + piece.shape[1]] = piece
        return mask


class AutomaticMaskGenerator:
    def __init__(
        self, model: Sam, settings: AmgSettings | None = None, *, dtype: str = "fp32", **overrides: Any
    ) -> None:
        """
        Args:
          model: any zoo model (``create_model``); its device is used.
          settings: an ``AmgSettings`` (default: segment-anything's defaults).
          dtype: the predictor's precision ("fp32", "bf16", "fp16"; ``SamPredictor``).
          **overrides: any ``AmgSettings`` field by name, e.g. ``points_per_side=16``; they
            replace the same fields of ``settings``. See ``AmgSettings`` for each setting.
        Raises:
          AmgConfigError: a setting is missing, contradictory or out of range.
          TypeError: an override is not an ``AmgSettings`` field.
        """
        settings = dataclasses.replace(settings or AmgSettings(), **overrides)
        self.settings = settings
        self.model = model
        self.predictor = SamPredictor(model, dtype=dtype)
        self.point_grids = settings.layer_grids()
        self.points_per_batch = settings.points_per_batch
        self.pred_iou_thresh = settings.pred_iou_thresh
        self.stability_score_thresh = settings.stability_score_thresh
        self.stability_score_offset = settings.stability_score_offset
        self.box_nms_thresh = settings.box_nms_thresh
        self.crop_n_layers = settings.crop_n_layers
        self.crop_nms_thresh = settings.crop_nms_thresh
        self.crop_overlap_ratio = settings.crop_overlap_ratio
        self.crop_n_points_downscale_factor = settings.crop_n_points_downscale_factor
        self.min_mask_region_area = settings.min_mask_region_area
        self.output_mode = settings.output_mode
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ public API
    @torch.inference_mode()
    def generate(
        self, image: np.ndarray, *, progress: Callable[[int, int], None] | None = None
    ) -> list[dict[str, Any]]:
        """Masks for everything in ``image`` (HxWx3 uint8 RGB; grayscale/RGBA/16-bit converted).

        Args:
          progress: called as ``progress(points_done, points_total)`` after every decoder pass.
        Returns:
          one record per mask, best first within a crop: ``segmentation`` (HxW bool array or a
          COCO RLE dict, see ``output_mode``), ``area`` (pixels), ``bbox`` (xywh, SAM's
          convention: x + w is the last covered column), ``predicted_iou``, ``point_coords``
          ([[x, y]], the prompt), ``stability_score``, ``crop_box`` (xywh).
        Raises:
          DataError: ``image`` is not an image-shaped array.
        """
        image = to_rgb_uint8(image)
        size = (int(image.shape[0]), int(image.shape[1]))
        self.timings = {"encoder_s": 0.0, "decoder_s": 0.0, "postprocess_s": 0.0}
        crop_boxes, layers = generate_crop_boxes(size, self.crop_n_layers, self.crop_overlap_ratio)
        total = sum(len(self.point_grids[layer]) for layer in layers)
        done = [0]

        def step(n: int) -> None:
            done[0] += n
            if progress is not None:
                progress(done[0], total)

        data = _Candidates()
        for crop_box, layer in zip(crop_boxes, layers, strict=True):
            data.extend(self._process_crop(image, crop_box, layer, size, step))

        t0 = time.perf_counter()
        if len(crop_boxes) > 1 and len(data) > 0:
            crop_t = torch.tensor(data.crop_boxes, dtype=torch.int64)
            areas = (crop_t[:, 2] - crop_t[:, 0]) * (crop_t[:, 3] - crop_t[:, 1])
            keep = _nms(data.box_tensor(), 1 / areas, self.crop_nms_thresh)  # smaller crops win
            data = data.select(keep)
        if self.min_mask_region_area > 0 and len(data) > 0:
            data = self._remove_small_regions(data, size)
        records = self._records(data, size)
        self.timings["postprocess_s"] += time.perf_counter() - t0
        return records

    # ------------------------------------------------------------------ one crop
    def _process_crop(
        self,
        image: np.ndarray,
        crop_box: list[int],
        layer: int,
        size: tuple[int, int],
        step: Callable[[int], None],
    ) -> _Candidates:
        x0, y0, x1, y1 = crop_box
        t0 = time.perf_counter()
        self.predictor.set_image(image[y0:y1, x0:x1])
        self.timings["encoder_s"] += time.perf_counter() - t0

        crop_h, crop_w = y1 - y0, x1 - x0
        points = self.point_grids[layer] * np.array([[crop_w, crop_h]])
        data = _Candidates()
        t0 = time.perf_counter()
        for start in range(0, len(points), self.points_per_batch):
            batch = points[start : start + self.points_per_batch]
            self._process_batch(batch, crop_box, size, data)
            step(len(batch))
        self.predictor.reset_image()

        data.compact()
        if len(data) > 0:
            keep = _nms(data.boxes[0], data.iou[0], self.box_nms_thresh)
            data = data.select(keep)
            data.boxes = [data.boxes[0] + torch.tensor([x0, y0, x0, y0])]
            data.points = [data.points[0] + np.array([[x0, y0]])]
            data.offsets = [(r + y0, c + x0) for r, c in data.offsets]
        self.timings["decoder_s"] += time.perf_counter() - t0
        return data

    def _process_batch(
        self, points: np.ndarray, crop_box: list[int], size: tuple[int, int], data: _Candidates
    ) -> None:
        """Decode one batch of (N, 2) points (crop pixels) and append the masks that survive.

        The batch is decoded in passes of the predictor's ``max_prompts_per_pass`` prompts, each
        carried through to its surviving masks before the next starts: the transformer's state
        for a prompt (its image tokens, kept for the mask head) is megabytes, so the passes, not
        ``points_per_batch``, bound the memory. Prompts are independent and their masks are
        appended in prompt order, so the results do not depend on either size.
        """
        step = max(1, self.predictor.max_prompts_per_pass)
        for start in range(0, len(points), step):
            self._process_pass(points[start : start + step], crop_box, size, data)

    def _process_pass(
        self, points: np.ndarray, crop_box: list[int], size: tuple[int, int], data: _Candidates
    ) -> None:
        dev = self.model.device
        backend = self.predictor.backend
        # Float64 prompt coordinates, as the official generator passes them.
        coords = torch.as_tensor(self.predictor.apply_coords(points), device=dev)[:, None, :]
        labels = torch.ones(coords.shape[0], 1, dtype=torch.int64, device=dev)
        iou, tokens = backend.decode_tokens(coords, labels)  # iou (N, 3): the multimask outputs

        keep = (
            iou > self.pred_iou_thresh
            if self.pred_iou_thresh > 0.0
            else torch.ones_like(iou, dtype=torch.bool)
        )
        flat = keep.flatten().nonzero().squeeze(1)  # prompt-major order, as SAM flattens (N, 3)
        if flat.numel() == 0:
            return
        prompt_idx, token_idx = flat // 3, flat % 3
        low_res = backend.mask_logits(tokens, prompt_idx, token_idx)  # (K, 256, 256)
        del tokens
        iou_kept = iou.flatten()[flat]
        points_kept = points[prompt_idx.cpu().numpy()]

        pred = self.predictor
        assert pred.input_size is not None and pred.original_size is not None
        h, w = pred.original_size
        chunk = max(1, _FULL_RES_BUDGET // (self.model.prompt_size**2 + h * w))
        threshold = self.model.mask_threshold
        for start in range(0, low_res.shape[0], chunk):
            sl = slice(start, start + chunk)
            logits = backend.upscale(low_res[sl, None].float(), pred.input_size, (h, w), binary=False)[:, 0]
            stab = stability_score(logits, threshold, self.stability_score_offset)
            if self.stability_score_thresh > 0.0:
                ok = stab >= self.stability_score_thresh
            else:
                ok = torch.ones_like(stab, dtype=torch.bool)
            masks = logits[ok] > threshold
            del logits
            boxes = masks_to_boxes(masks)
            inside = ~box_near_crop_edge(boxes, crop_box, [0, 0, size[1], size[0]])
            idx = ok.nonzero().squeeze(1)[inside]
            masks, boxes = masks[inside], boxes[inside]
            if idx.numel() == 0:
                continue
            data.boxes.append(boxes.cpu())
            data.iou.append(iou_kept[sl][idx].float().cpu())
            data.stability.append(stab[idx].cpu())
            data.points.append(points_kept[sl][idx.cpu().numpy()])
            data.crop_boxes.extend([list(crop_box)] * idx.numel())
            for m, (bx0, by0, bx1, by1) in zip(masks, boxes.tolist(), strict=True):
                data.pieces.append(m[by0 : by1 + 1, bx0 : bx1 + 1].cpu().numpy())
                data.offsets.append((by0, bx0))

    # ------------------------------------------------------------------ post-processing
    def _remove_small_regions(self, data: _Candidates, size: tuple[int, int]) -> _Candidates:
        """Fill small holes, drop small islands, then NMS again preferring untouched masks."""
        new_masks, boxes, unchanged = [], [], []
        for i in range(len(data)):
            mask = data.full_mask(i, size)
            mask, filled = remove_small_regions(mask, self.min_mask_region_area, "holes")
            mask, dropped = remove_small_regions(mask, self.min_mask_region_area, "islands")
            new_masks.append(mask)
            boxes.append(mask_to_box(mask))
            unchanged.append(0.0 if (filled or dropped) else 1.0)
        box_t = torch.tensor(boxes, dtype=torch.int64)
        keep = _nms(box_t, torch.tensor(unchanged), max(self.box_nms_thresh, self.crop_nms_thresh))
        data.compact()
        for i in keep.tolist():
            if unchanged[i] == 0.0:
                bx0, by0, bx1, by1 = boxes[i]
                data.pieces[i] = new_masks[i][by0 : by1 + 1, bx0 : bx1 + 1]
                data.offsets[i] = (by0, bx0)
                data.boxes[0][i] = box_t[i]
        return data.select(keep)

    def _records(self, data: _Candidates, size: tuple[int, int]) -> list[dict[str, Any]]:
        if len(data) == 0:
            return []
        data.compact()
        boxes = data.boxes[0].tolist()
        ious = data.iou[0].tolist()
        stabs = data.stability[0].tolist()
        points = data.points[0].tolist()
        records = []
        for i in range(len(data)):
            mask = data.full_mask(i, size)
            if self.output_mode == "binary_mask":
                seg: Any = mask
            elif self.output_mode == "coco_rle":
                seg = mask_to_coco_rle(mask)
            else:
                seg = mask_to_rle(mask)
            records.append(
                {
                    "segmentation": seg,
                    "area": int(data.pieces[i].sum()),
                    "bbox": xyxy_to_xywh(boxes[i]),
                    "predicted_iou": ious[i],
                    "point_coords": [points[i]],
                    "stability_score": stabs[i],
                    "crop_box": xyxy_to_xywh(data.crop_boxes[i]),
                }
            )
        return records


def validate_settings(**settings: Any) -> list[np.ndarray]:
    """Check ``AmgSettings(**settings)`` without a model; the point grid of every crop layer.

    Raises ``AmgConfigError``.
    """
    return AmgSettings(**settings).layer_grids()


def _nms(boxes: Tensor, scores: Tensor, threshold: float) -> Tensor:
    """Indices kept by box NMS, best score first (one class: torchvision's batched_nms)."""
    boxes = boxes.float()
    return batched_nms(boxes, scores.to(boxes.device), torch.zeros_like(boxes[:, 0]), iou_threshold=threshold)

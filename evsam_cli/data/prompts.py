"""Prompts given to a predictor: checked, and converted to SAM's prompt frame (numpy only).

``SamPredictor`` and the exported-model predictors (``export/runtime.py``, which must not
import torch) take the same prompts with the same checks through here: points (N, K, 2) x,y
with labels (N, K), boxes (N, 4) xyxy, both in original-image pixels, and low-res mask inputs
(N, 1, 256, 256).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .frames import boxes_to_frame, coords_to_frame
from .images import to_rgb_uint8

# SAM's point labels for a box's corners and for the padding point of a box-less prompt.
BOX_CORNER_LABELS = (2.0, 3.0)
PAD_LABEL = -1.0


@dataclass
class Prompts:
    """N checked prompts of one image, in the prompt frame."""

    count: int
    point_coords: np.ndarray | None  # (N, K, 2) float64, prompt frame
    point_labels: np.ndarray | None  # (N, K) as given (1 foreground, 0 background, -1 padding)
    boxes: np.ndarray | None  # (N, 4) float64 xyxy, prompt frame
    mask_input: np.ndarray | None  # (N, 1, h, w) float32 low-res logits

    def decoder_points(self) -> tuple[np.ndarray, np.ndarray]:
        """Points and boxes as the exported decoder graph takes them: coords (N, K', 2) and
        labels (N, K') float32. Points come first; a box adds its two corners (labels 2, 3);
        without a box one padding point (label -1) is appended, as SAM's prompt encoder does."""
        if self.point_coords is None and self.boxes is None:
            raise ValueError("exported predictors need point or box prompts (a mask alone is not supported)")
        n = self.count
        coords: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        if self.point_coords is not None and self.point_labels is not None:
            coords.append(self.point_coords.astype(np.float32))
            labels.append(self.point_labels.astype(np.float32))
        if self.boxes is not None:
            coords.append(self.boxes.astype(np.float32).reshape(n, 2, 2))
            labels.append(np.tile(np.array([BOX_CORNER_LABELS], dtype=np.float32), (n, 1)))
        else:
            coords.append(np.zeros((n, 1, 2), dtype=np.float32))
            labels.append(np.full((n, 1), PAD_LABEL, dtype=np.float32))
        return np.concatenate(coords, axis=1), np.concatenate(labels, axis=1)


def single_prompt(
    point_coords: Any, point_labels: Any, box: Any, mask_input: Any
) -> dict[str, np.ndarray | None]:
    """``predict``'s one prompt set (points (K, 2), labels (K,), box (4,), mask (1, h, w)) as
    ``predict_batch``'s arguments for N = 1."""
    if point_coords is not None and point_labels is None:
        raise ValueError("point_labels must be given with point_coords")
    return {
        "point_coords": None if point_coords is None else np.asarray(point_coords)[None],
        "point_labels": None if point_labels is None else np.asarray(point_labels)[None],
        "boxes": None if box is None else np.asarray(box).reshape(1, 4),
        "mask_input": None if mask_input is None else np.asarray(mask_input)[None],
    }


def prepare_prompts(
    point_coords: Any,
    point_labels: Any,
    boxes: Any,
    mask_input: Any,
    *,
    original_size: tuple[int, int],
    frame_size: tuple[int, int],
) -> Prompts:
    """Check ``predict_batch``'s prompts and convert them to the prompt frame, where the image
    of ``original_size`` (h, w) occupies ``frame_size`` (h, w).

    Raises:
      ValueError: a prompt has the wrong shape, labels are missing, or the counts differ.
    """
    coords = labels = frame_boxes = masks = None
    n = None
    if point_coords is not None:
        if point_labels is None:
            raise ValueError("point_labels must be given with point_coords")
        raw, labels = np.asarray(point_coords), np.asarray(point_labels)
        if raw.ndim != 3 or raw.shape[-1] != 2 or labels.shape != raw.shape[:2]:
            raise ValueError(
                f"point_coords must be (N, K, 2) and point_labels (N, K); got {raw.shape}, {labels.shape}"
            )
        coords = coords_to_frame(raw, original_size, frame_size)  # float64, as SAM
        n = raw.shape[0]
    if boxes is not None:
        b = np.asarray(boxes)
        if b.ndim != 2 or b.shape[1] != 4:
            raise ValueError(f"boxes must be (N, 4) xyxy, got shape {b.shape}")
        if n is not None and b.shape[0] != n:
            raise ValueError(f"{b.shape[0]} boxes but {n} point prompts")
        frame_boxes = boxes_to_frame(b, original_size, frame_size)
        n = b.shape[0]
    if mask_input is not None:
        masks = np.asarray(mask_input, dtype=np.float32)
        if masks.ndim != 4 or masks.shape[1] != 1 or (n is not None and masks.shape[0] != n):
            want = "N" if n is None else str(n)
            raise ValueError(f"mask_input must be ({want}, 1, 256, 256), got {masks.shape}")
        n = masks.shape[0] if n is None else n
    return Prompts(1 if n is None else n, coords, labels, frame_boxes, masks)


class PromptablePredictor:
    """SAM's predictor API around one image, shared by ``SamPredictor`` and the exported-model
    predictors: the image's frame, prompt transforms and checks, ``predict`` as ``predict_batch``
    of one prompt set. Subclasses embed images (``set_image``, ``set_embedding``, calling
    ``_set_frame``) and decode (``predict_batch``)."""

    features: Any = None

    def reset_image(self) -> None:
        self.features = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None  # image size inside the prompt frame
        self.is_image_set = False

    def frame_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """Size (h, w) of an image of ``original_size`` inside the prompt frame."""
        raise NotImplementedError

    def _set_frame(self, original_size: tuple[int, int]) -> None:
        self.original_size = (int(original_size[0]), int(original_size[1]))
        self.input_size = self.frame_size(self.original_size)
        self.is_image_set = True

    @staticmethod
    def _rgb(image: np.ndarray, image_format: str) -> np.ndarray:
        """``set_image``'s input as HxWx3 uint8 RGB (grayscale, RGBA, 16-bit and BGR converted)."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        image = to_rgb_uint8(image)
        return np.ascontiguousarray(image[..., ::-1]) if image_format == "BGR" else image

    def get_image_embedding(self) -> Any:
        self._check_image()
        return self.features

    def _check_image(self) -> None:
        if not self.is_image_set:
            raise RuntimeError("an image must be set with .set_image(...) before mask prediction")

    # ------------------------------------------------------------------ prompts
    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        """(..., 2) x,y in original pixels -> the prompt frame (float64, as the reference)."""
        assert self.original_size is not None and self.input_size is not None
        return coords_to_frame(coords, self.original_size, self.input_size)

    def apply_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """(N, 4) xyxy in original pixels -> the prompt frame."""
        assert self.original_size is not None and self.input_size is not None
        return boxes_to_frame(np.asarray(boxes).reshape(-1, 4), self.original_size, self.input_size)

    def _prompts(self, point_coords: Any, point_labels: Any, boxes: Any, mask_input: Any) -> Prompts:
        """``predict_batch``'s prompts, checked, in the current image's prompt frame."""
        self._check_image()
        assert self.original_size is not None and self.input_size is not None
        return prepare_prompts(
            point_coords,
            point_labels,
            boxes,
            mask_input,
            original_size=self.original_size,
            frame_size=self.input_size,
        )

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One prompt set: points (K, 2) with labels (K,) 1/0, a box (4,) xyxy, a (1, 256, 256) mask.

        Returns masks (C, H, W) (bool, or float logits with ``return_logits``), scores (C,) and
        low-res logits (C, 256, 256); C = 3 with ``multimask_output`` else 1.
        """
        masks, scores, low_res = self.predict_batch(
            **single_prompt(point_coords, point_labels, box, mask_input),
            multimask_output=multimask_output,
            return_logits=return_logits,
        )
        return masks[0], scores[0], low_res[0]

    def predict_batch(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        boxes: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """N prompts of the current image in batched decoder passes.

        Args:
          point_coords: (N, K, 2) x,y pixels; point_labels: (N, K) with 1/0 (-1 pads).
          boxes: (N, 4) xyxy pixels.
          mask_input: (N, 1, 256, 256) low-res logits from an earlier prediction.
        Returns:
          masks (N, C, H, W) (bool, or float logits with ``return_logits``), scores (N, C) and
          low-res logits (N, C, 256, 256) as numpy arrays; C = 3 with ``multimask_output`` else 1.
        """
        prompts = self._prompts(point_coords, point_labels, boxes, mask_input)
        return self._predict_prompts(prompts, multimask_output=multimask_output, return_logits=return_logits)

    def _predict_prompts(
        self, prompts: Prompts, *, multimask_output: bool, return_logits: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``predict_batch`` for prompts already checked and in the prompt frame: the part each
        predictor runs its own way."""
        raise NotImplementedError

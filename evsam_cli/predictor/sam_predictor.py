"""Promptable prediction on one image at a time, with segment-anything's semantics.

``SamPredictor`` embeds an image once (``set_image``) and then decodes prompts against it:
``predict`` for one prompt set (SAM's API), ``predict_batch`` for N prompts in one decoder pass.
Prompts are given in original-image pixels; masks come back at the original image size.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..accel.passes import map_passes
from ..data.frames import boxes_to_frame, coords_to_frame
from ..data.images import to_rgb_uint8
from ..models.sam import Sam


def default_prompts_per_pass(device: torch.device) -> int:
    """Prompts per decoder pass: 256 on a GPU; 16 on CPU, where the streamed decoder
    (``accel/streaming.py``) already works in cache-sized tiles: 16 and 32 were about 5%
    faster than 8 for 64 or 100 boxes on a 2-core CPU, and 16 no slower for a 2000x1500 image,
    whose full-size masks make larger passes heavier."""
    return 256 if device.type == "cuda" else 16


class SamPredictor:
    def __init__(self, model: Sam, *, max_prompts_per_pass: int | None = None, optimize: bool = True) -> None:
        """
        Args:
          model: any zoo model (``create_model``), with its weights already loaded.
          max_prompts_per_pass: prompts decoded per decoder call in ``predict_batch``. Default:
            ``default_prompts_per_pass`` (256 on a GPU, 16 on CPU).
          optimize: run the image encoder through an inference copy with BatchNorm folded and
            channels-last layout (same outputs up to float rounding; the model is untouched).
            The copy is taken now: weights changed later are not seen by this predictor.
        """
        from ..accel.encoder import optimize_encoder

        self.model = model
        if max_prompts_per_pass is None:
            max_prompts_per_pass = default_prompts_per_pass(model.device)
        self.max_prompts_per_pass = max_prompts_per_pass
        self.image_encoder = optimize_encoder(model.image_encoder) if optimize else model.image_encoder
        self.reset_image()

    # ------------------------------------------------------------------ image
    def reset_image(self) -> None:
        self.features: Tensor | None = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None  # image size inside the prompt frame
        self.is_image_set = False

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.inference_mode()
    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Embed an image. ``image``: HxWx3 uint8 (grayscale, RGBA and 16-bit are converted)."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        image = to_rgb_uint8(image)
        if image_format == "BGR":
            image = np.ascontiguousarray(image[..., ::-1])
        x = self.model.preprocess(image)
        self.set_embedding(self.image_encoder(x), image.shape[:2])

    def set_embedding(self, embedding: Tensor, original_size: tuple[int, int]) -> None:
        """Use a precomputed (1, 256, 64, 64) embedding of an image of ``original_size`` (h, w)."""
        if embedding.dim() == 3:
            embedding = embedding.unsqueeze(0)
        self.features = embedding.to(self.device)
        self.original_size = (int(original_size[0]), int(original_size[1]))
        self.input_size = self.model.prompt_frame_size(self.original_size)
        self.is_image_set = True

    def get_image_embedding(self) -> Tensor:
        self._check_image()
        assert self.features is not None
        return self.features

    def _check_image(self) -> None:
        if not self.is_image_set:
            raise RuntimeError("an image must be set with .set_image(...) before mask prediction")

    # ------------------------------------------------------------------ prompt transforms
    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        """(..., 2) x,y in original pixels -> the prompt frame (float64, as the reference)."""
        assert self.original_size is not None and self.input_size is not None
        return coords_to_frame(coords, self.original_size, self.input_size)

    def apply_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """(N, 4) xyxy in original pixels -> the prompt frame."""
        assert self.original_size is not None and self.input_size is not None
        return boxes_to_frame(np.asarray(boxes).reshape(-1, 4), self.original_size, self.input_size)

    # ------------------------------------------------------------------ prediction
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
        if point_coords is not None and point_labels is None:
            raise ValueError("point_labels must be given with point_coords")
        masks, scores, low_res = self.predict_batch(
            point_coords=None if point_coords is None else np.asarray(point_coords)[None],
            point_labels=None if point_labels is None else np.asarray(point_labels)[None],
            boxes=None if box is None else np.asarray(box).reshape(1, 4),
            mask_input=None if mask_input is None else np.asarray(mask_input)[None],
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
        """N prompts of the current image in batched decoder passes (on a CPU, two halves of the
        passes run on two threads at once: ``passes.map_passes``).

        Args:
          point_coords: (N, K, 2) x,y pixels; point_labels: (N, K) with 1/0 (-1 pads).
          boxes: (N, 4) xyxy pixels.
          mask_input: (N, 1, 256, 256) low-res logits from an earlier prediction.
        Returns:
          masks (N, C, H, W), scores (N, C), low-res logits (N, C, 256, 256) as numpy arrays.
        """
        self._check_image()
        coords_t = labels_t = boxes_t = mask_t = None
        n = None
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must be given with point_coords")
            coords = np.asarray(point_coords)
            labels = np.asarray(point_labels)
            if coords.ndim != 3 or coords.shape[-1] != 2 or labels.shape != coords.shape[:2]:
                raise ValueError(
                    f"point_coords must be (N, K, 2) and point_labels (N, K); got {coords.shape}, {labels.shape}"
                )
            coords_t = torch.as_tensor(self.apply_coords(coords), dtype=torch.float32, device=self.device)
            labels_t = torch.as_tensor(labels, dtype=torch.int64, device=self.device)
            n = coords.shape[0]
        if boxes is not None:
            b = np.asarray(boxes)
            if b.ndim != 2 or b.shape[1] != 4:
                raise ValueError(f"boxes must be (N, 4) xyxy, got shape {b.shape}")
            if n is not None and b.shape[0] != n:
                raise ValueError(f"{b.shape[0]} boxes but {n} point prompts")
            boxes_t = torch.as_tensor(self.apply_boxes(b), dtype=torch.float32, device=self.device)
            n = b.shape[0]
        if mask_input is not None:
            mask_t = torch.as_tensor(np.asarray(mask_input), dtype=torch.float32, device=self.device)
            if mask_t.dim() != 4 or mask_t.shape[1] != 1:
                raise ValueError(f"mask_input must be (N, 1, 256, 256), got {tuple(mask_t.shape)}")
            n = mask_t.shape[0] if n is None else n
        n = 1 if n is None else n

        def decode(sl: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            masks, scores, low_res = self.predict_torch(
                None if coords_t is None else coords_t[sl],
                None if labels_t is None else labels_t[sl],
                None if boxes_t is None else boxes_t[sl],
                None if mask_t is None else mask_t[sl],
                multimask_output=multimask_output,
                return_logits=return_logits,
            )
            return masks.cpu().numpy(), scores.float().cpu().numpy(), low_res.float().cpu().numpy()

        passes = map_passes(decode, n, self.max_prompts_per_pass, self.device)
        return tuple(np.concatenate(parts) for parts in zip(*passes, strict=True))  # type: ignore[return-value]

    @torch.inference_mode()
    def predict_torch(
        self,
        point_coords: Tensor | None = None,
        point_labels: Tensor | None = None,
        boxes: Tensor | None = None,
        mask_input: Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Prompts already in the prompt frame, as tensors -> masks (N, C, H, W), scores, low-res."""
        self._check_image()
        assert self.features is not None and self.input_size is not None and self.original_size is not None
        low_res, scores = self.model.decode(
            self.features,
            point_coords=point_coords,
            point_labels=point_labels,
            boxes=boxes,
            mask_input=mask_input,
            multimask_output=multimask_output,
        )
        if return_logits:
            masks = self.model.postprocess_masks(low_res.float(), self.input_size, self.original_size)
        else:
            masks = self.model.postprocess_binary(low_res.float(), self.input_size, self.original_size)
        return masks, scores, low_res

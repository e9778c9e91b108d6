"""Promptable prediction on one image at a time, with segment-anything's semantics.

``SamPredictor`` embeds an image once (``set_image``) and then decodes prompts against it:
``predict`` for one prompt set (SAM's API), ``predict_batch`` for N prompts in one decoder pass.
Prompts are given in original-image pixels; masks come back at the original image size.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..accel.backend import ReferenceBackend, select_backend
from ..data.prompts import PromptablePredictor, Prompts
from ..models.sam import Sam


def default_prompts_per_pass(device: torch.device) -> int:
    """Prompts per decoder pass: 256 on a GPU, where one large pass keeps the device busy; 16 on
    CPU, where the streamed decoder (``accel/streaming.py``) already works in cache-sized tiles
    and larger passes only add full-size mask memory (docs/benchmarks.md has the measurements)."""
    return 256 if device.type == "cuda" else 16


class SamPredictor(PromptablePredictor):
    features: Tensor | None

    def __init__(
        self,
        model: Sam,
        *,
        max_prompts_per_pass: int | None = None,
        optimize: bool = True,
        backend: str | ReferenceBackend = "auto",
        dtype: str = "fp32",
    ) -> None:
        """
        Args:
          model: any zoo model (``create_model``), with its weights already loaded.
          max_prompts_per_pass: prompts decoded per decoder call in ``predict_batch``. Default:
            ``default_prompts_per_pass`` (256 on a GPU, 16 on CPU).
          optimize: run the image encoder through an inference copy with BatchNorm folded and
            channels-last layout (same outputs up to float rounding; the model is untouched).
          backend: how the model runs (``accel/backend.py``): "auto" (the CPU speed-ups for a
            float32 model on the CPU, the model's own modules otherwise), "cpu", "reference",
            or a backend instance. The CPU backend and ``optimize`` copy the weights they use
            now: weights changed later are not seen by this predictor.
          dtype: "fp32"; "bf16" (CPUs with bf16 instructions, GPUs) or "fp16" (GPUs) run the
            image encoder and mask decoder as reduced-precision copies, with normalisation,
            LiteMLA's attention sums, the prompt encoder and mask upscaling in float32
            (docs/precision.md). ``PrecisionError`` where the device cannot run it.
        """
        self.model = model
        if max_prompts_per_pass is None:
            max_prompts_per_pass = default_prompts_per_pass(model.device)
        self.max_prompts_per_pass = max_prompts_per_pass
        self.dtype = dtype
        self.backend = select_backend(model, backend, optimize_encoder=optimize, dtype=dtype)
        self.image_encoder = self.backend.image_encoder
        self.reset_image()

    # ------------------------------------------------------------------ image
    @property
    def device(self) -> torch.device:
        return self.model.device

    def frame_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        return self.model.prompt_frame_size(original_size)

    @torch.inference_mode()
    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Embed an image. ``image``: HxWx3 uint8 (grayscale, RGBA and 16-bit are converted)."""
        image = self._rgb(image, image_format)
        x = self.model.preprocess(image)
        self.set_embedding(self.backend.encode(x), image.shape[:2])

    def set_embedding(self, embedding: Tensor, original_size: tuple[int, int]) -> None:
        """Use a precomputed (1, 256, 64, 64) embedding of an image of ``original_size`` (h, w)."""
        if embedding.dim() == 3:
            embedding = embedding.unsqueeze(0)
        self.features = embedding.to(self.device)
        self.backend.set_embedding(self.features)
        self._set_frame(original_size)

    def _tensors(self, prompts: Prompts) -> dict[str, Tensor | None]:
        """The prompts as the backend takes them (float32 coordinates, int64 labels)."""

        def tensor(a: np.ndarray | None, dtype: torch.dtype) -> Tensor | None:
            return None if a is None else torch.as_tensor(a, dtype=dtype, device=self.device)

        return {
            "point_coords": tensor(prompts.point_coords, torch.float32),
            "point_labels": tensor(prompts.point_labels, torch.int64),
            "boxes": tensor(prompts.boxes, torch.float32),
            "mask_input": tensor(prompts.mask_input, torch.float32),
        }

    # ------------------------------------------------------------------ prediction
    def _predict_prompts(
        self, prompts: Prompts, *, multimask_output: bool, return_logits: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Passes of ``max_prompts_per_pass`` prompts through the backend (on a CPU, two halves
        of the passes may run on two threads at once: ``accel/passes.py``)."""
        inputs = self._tensors(prompts)

        def decode(sl: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            masks, scores, low_res = self.predict_torch(
                **{k: None if v is None else v[sl] for k, v in inputs.items()},
                multimask_output=multimask_output,
                return_logits=return_logits,
            )
            return masks.cpu().numpy(), scores.float().cpu().numpy(), low_res.float().cpu().numpy()

        passes = self.backend.map_passes(decode, prompts.count, self.max_prompts_per_pass)
        return tuple(np.concatenate(parts) for parts in zip(*passes, strict=True))  # type: ignore[return-value]

    @torch.inference_mode()
    def predict_best(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        boxes: np.ndarray | None = None,
        *,
        max_prompts_per_pass: int | None = None,
    ) -> Tensor:
        """For each of N prompts, the multimask output with the highest predicted IoU, at the
        original size and thresholded: SAM's ``predict(..., multimask_output=True)`` then
        ``masks[scores.argmax()]``, with the IoU predictions made first and only the chosen mask
        made and upscaled.

        Args:
          point_coords / point_labels / boxes: as ``predict_batch``.
          max_prompts_per_pass: prompts per decoder pass (default ``self.max_prompts_per_pass``;
            each pass holds its masks at full size).
        Returns:
          (N, H, W) bool masks on the model's device.
        """
        prompts = self._prompts(point_coords, point_labels, boxes, None)
        inputs = self._tensors(prompts)
        assert self.input_size is not None and self.original_size is not None
        frame, size = self.input_size, self.original_size
        out = torch.empty((prompts.count, *size), dtype=torch.bool, device=self.device)
        # Only the low-res logits the upscaling weighs are needed: the padding of the frame is not.
        # (The low-res logits are the size of a mask input: SAM feeds them back as one.)
        extent = self.backend.read_extent(self.model.prompt_encoder.mask_input_size, frame, size)

        @torch.inference_mode()  # grad mode is per thread, and map_passes may use a second one
        def decode(sl: slice) -> None:
            # The IoU predictions come before the mask head, so it runs for the chosen masks only.
            iou, tokens = self.backend.decode_tokens(
                **{k: None if v is None else v[sl] for k, v in inputs.items() if k != "mask_input"}
            )
            best = iou.argmax(dim=1)
            chosen = self.backend.mask_logits(
                tokens, torch.arange(len(best), device=best.device), best, extent=extent
            )
            out[sl] = self.backend.upscale(chosen[:, None], frame, size, binary=True)[:, 0]

        self.backend.map_passes(decode, prompts.count, max_prompts_per_pass or self.max_prompts_per_pass)
        return out

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
        assert self.input_size is not None and self.original_size is not None
        low_res, scores = self.backend.decode(
            point_coords=point_coords,
            point_labels=point_labels,
            boxes=boxes,
            mask_input=mask_input,
            multimask_output=multimask_output,
        )
        masks = self.backend.upscale(
            low_res.float(), self.input_size, self.original_size, binary=not return_logits
        )
        return masks, scores, low_res

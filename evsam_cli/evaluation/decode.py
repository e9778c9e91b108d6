"""All prompts of one image through the mask decoder in a few batched passes.

Each prompt gets SAM's multimask output and keeps the mask with the highest predicted IoU,
upscaled to the original image size and thresholded at 0 -- the official evaluation's
``predictor.predict(..., multimask_output=True)`` followed by ``masks[iou.argmax()]``, but
one decoder call per chunk of prompts instead of one per prompt, and only the chosen mask
upscaled (on a CPU, two halves of the passes on two threads at once: ``passes.map_passes``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..accel.passes import map_passes
from ..data.frames import boxes_to_frame, coords_to_frame
from ..models.sam import Sam


@torch.inference_mode()
def best_masks(
    model: Sam,
    embedding: Tensor,
    original_size: tuple[int, int],
    *,
    boxes: np.ndarray | None = None,
    point_coords: np.ndarray | None = None,
    point_labels: np.ndarray | None = None,
    chunk: int = 32,
) -> Tensor:
    """Best-of-multimask masks for N prompts of one image.

    Args:
      embedding: (1, 256, 64, 64) image embedding.
      original_size: (H, W) of the image.
      boxes: (N, 4) xyxy pixels; or point_coords (N, K, 2) x,y pixels with point_labels (N, K).
      chunk: prompts per decoder pass (bounds memory: each mask is upscaled to H x W).
    Returns:
      (N, H, W) bool masks on the model's device.
    """
    frame = model.prompt_frame_size(original_size)
    device = model.device
    if boxes is not None:
        n = len(boxes)
        boxes_t = torch.as_tensor(boxes_to_frame(np.asarray(boxes).reshape(-1, 4), original_size, frame))
        boxes_t = boxes_t.to(device=device, dtype=torch.float32)
    elif point_coords is not None and point_labels is not None:
        n = len(point_coords)
        coords_t = torch.as_tensor(coords_to_frame(point_coords, original_size, frame)).to(
            device=device, dtype=torch.float32
        )
        labels_t = torch.as_tensor(np.asarray(point_labels), dtype=torch.int64, device=device)
    else:
        raise ValueError("give boxes or point_coords with point_labels")
    out = torch.empty((n, *original_size), dtype=torch.bool, device=device)

    @torch.inference_mode()  # grad mode is per thread, and map_passes may use a second one
    def decode(sl: slice) -> None:
        if boxes is not None:
            low_res, iou = model.decode(embedding, boxes=boxes_t[sl], multimask_output=True)
        else:
            low_res, iou = model.decode(
                embedding, point_coords=coords_t[sl], point_labels=labels_t[sl], multimask_output=True
            )
        best = iou.argmax(dim=1)
        chosen = low_res[torch.arange(low_res.shape[0], device=device), best].unsqueeze(1).float()
        out[sl] = model.postprocess_binary(chosen, frame, original_size)[:, 0]

    map_passes(decode, n, chunk, device)
    return out

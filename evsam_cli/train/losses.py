"""Training losses as pure functions (after sam2's ``loss_fns.py``), and SAM's combination of them.

All mask losses take logits and binary targets of the same shape ``(..., H, W)`` and return one
value per mask ``(...)``; the caller decides how to reduce (mean over masks, or the minimum over
multimask outputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over every element: the distillation loss.

    Args:
      pred, target: (B, 256, 64, 64) student and teacher image embeddings.
    Returns: a scalar (computed in float32).
    """
    return F.mse_loss(pred.float(), target.float())


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, *, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Focal loss (Lin et al. 2017) averaged over pixels.

    ``FL = -alpha_t (1 - p_t)^gamma log(p_t)`` with ``p = sigmoid(logits)``,
    ``p_t = p`` for target 1 and ``1 - p`` for target 0, ``alpha_t = alpha`` / ``1 - alpha``.

    Args:
      logits: (..., H, W) mask logits.
      targets: (..., H, W) binary masks (0/1, any dtype).
    Returns: (...) the per-mask mean over its H*W pixels.
    """
    logits, targets = logits.float(), targets.float()
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.flatten(-2).mean(-1)


def dice_loss(logits: Tensor, targets: Tensor, *, eps: float = 1.0) -> Tensor:
    """Soft Dice loss ``1 - (2 sum(p t) + eps) / (sum(p) + sum(t) + eps)`` with ``p = sigmoid(logits)``.

    Args:
      logits: (..., H, W) mask logits.
      targets: (..., H, W) binary masks.
    Returns: (...) one value per mask, in [0, 1).
    """
    p = torch.sigmoid(logits.float()).flatten(-2)
    t = targets.float().flatten(-2)
    return 1 - (2 * (p * t).sum(-1) + eps) / (p.sum(-1) + t.sum(-1) + eps)


def mask_loss(
    logits: Tensor, targets: Tensor, *, focal_weight: float = 20.0, dice_weight: float = 1.0
) -> Tensor:
    """SAM's mask loss, ``20 * focal + 1 * dice`` by default (the paper's 20:1), per mask (...)."""
    return focal_weight * sigmoid_focal_loss(logits, targets) + dice_weight * dice_loss(logits, targets)


def min_over_outputs(per_output: Tensor) -> tuple[Tensor, Tensor]:
    """SAM's multimask rule: each prompt trains only its lowest-loss output.

    Args:
      per_output: (N, M) loss of each of the M outputs of N prompts.
    Returns: (N,) the minimum losses (gradients flow only through those) and (N,) their indices.
    """
    values, index = per_output.min(dim=1)
    return values, index


def mask_iou(logits: Tensor, targets: Tensor) -> Tensor:
    """IoU of thresholded (> 0) logits with binary targets, per mask (...); 1 when both are empty."""
    pred = logits > 0
    t = targets > 0.5
    inter = (pred & t).flatten(-2).sum(-1).float()
    union = (pred | t).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))

"""Training losses as pure functions (after sam2's ``loss_fns.py``), and SAM's combination of them.

All mask losses take logits and binary targets of the same shape ``(..., H, W)`` and return one
value per mask ``(...)``; the caller decides how to reduce (mean over masks, or the minimum over
multimask outputs).
"""

from __future__ import annotations

from typing import Any

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


# ---------------------------------------------------------------------------- fused, for training
# Elements of upsampled logits per chunk in ``upsampled_mask_losses`` on the CPU (16 masks of
# 512x512): bounds the memory of the intermediates while keeping each kernel call large enough
# that its thread start-up stays negligible, also when another process holds a core.
_CPU_CHUNK_ELEMENTS = 1 << 22


def upsampled_mask_losses(
    logits: Tensor,
    targets: Tensor,
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
    eps: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Focal loss, Dice loss and IoU of low-res mask logits bilinearly upsampled to the targets'
    size, the same values as ``sigmoid_focal_loss``, ``dice_loss`` and ``mask_iou`` of
    ``F.interpolate(logits, size, mode="bilinear", align_corners=False)`` (up to float rounding)
    and the same gradient.

    What differs is the order of work: masks are processed a chunk at a time (on the CPU) and
    nothing of the upsampled size is kept for the backward pass, which recomputes it only for the
    outputs whose losses receive a gradient (under SAM's multimask rule, one of three), with the
    gradient written out analytically (``_grad_logits``) rather than as autograd's chain of
    elementwise steps.

    Args:
      logits: (N, M, h, w) mask logits, M outputs per prompt (any float dtype).
      targets: (N, H, W) binary masks (bool or 0/1), one per prompt, shared by its M outputs.
    Returns:
      focal, dice, iou: (N, M) float32 each; iou (of ``logits > 0``) carries no gradient.
    """
    return _UpsampledMaskLosses.apply(logits, targets, alpha, gamma, eps)


def _chunk_masks(n: int, size: tuple[int, int], device: torch.device) -> int:
    if device.type != "cpu":
        return max(n, 1)
    return max(1, _CPU_CHUNK_ELEMENTS // (size[0] * size[1]))


def _upsample(logits: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(logits.float(), size, mode="bilinear", align_corners=False)


class _UpsampledMaskLosses(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, logits: Tensor, targets: Tensor, alpha: float, gamma: float, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        n, m = logits.shape[:2]
        size = (targets.shape[-2], targets.shape[-1])
        flat = logits.detach().reshape(n * m, 1, *logits.shape[-2:])
        owner = torch.arange(n * m, device=logits.device) // m  # the target of each output
        focal = torch.empty(n * m, dtype=torch.float32, device=logits.device)
        dice, iou = torch.empty_like(focal), torch.empty_like(focal)
        step = _chunk_masks(n * m, size, logits.device)
        for start in range(0, n * m, step):
            sl = slice(start, start + step)
            up = _upsample(flat[sl], size)[:, 0]
            t = targets[owner[sl]] > 0.5
            focal[sl], dice[sl], iou[sl] = _forward_terms(up, t, alpha, gamma, eps)
        ctx.save_for_backward(logits, targets)
        ctx.constants = (alpha, gamma, eps)
        iou = iou.reshape(n, m)
        ctx.mark_non_differentiable(iou)
        return focal.reshape(n, m), dice.reshape(n, m), iou

    @staticmethod
    def backward(
        ctx: Any, grad_focal: Tensor, grad_dice: Tensor, _grad_iou: Tensor
    ) -> tuple[Tensor | None, ...]:
        logits, targets = ctx.saved_tensors
        alpha, gamma, eps = ctx.constants
        n, m, h, w = logits.shape
        size = (targets.shape[-2], targets.shape[-1])
        g_focal, g_dice = grad_focal.reshape(-1).float(), grad_dice.reshape(-1).float()
        grad = torch.zeros(n * m, 1, h, w, dtype=torch.float32, device=logits.device)
        active = torch.nonzero((g_focal != 0) | (g_dice != 0)).flatten()
        flat = logits.detach().reshape(n * m, 1, h, w)
        step = _chunk_masks(len(active), size, logits.device)
        for ids in active.split(step):
            with torch.enable_grad():
                low = flat[ids].float().requires_grad_(True)
                up = _upsample(low, size)
                grad_up = _grad_logits(
                    up.detach()[:, 0], targets[ids // m] > 0.5, g_focal[ids], g_dice[ids], alpha, gamma, eps
                )
                grad[ids] = torch.autograd.grad(up, low, grad_up.unsqueeze(1))[0]
        return grad.reshape(logits.shape).to(logits.dtype), None, None, None, None


def _forward_terms(
    up: Tensor, t: Tensor, alpha: float, gamma: float, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(K, H, W) upsampled logits, bool targets -> focal, dice, iou (K,) as the reference computes."""
    tf = t.float()
    p = torch.sigmoid(up)
    ce = F.binary_cross_entropy_with_logits(up, tf, reduction="none")
    q = torch.where(t, 1 - p, p)  # 1 - p_t
    weighted = ce * q**gamma
    total = weighted.flatten(1).sum(1)
    if alpha >= 0:  # alpha_t = alpha on the target's pixels, 1 - alpha elsewhere
        positive = (weighted * tf).flatten(1).sum(1)
        total = alpha * positive + (1 - alpha) * (total - positive)
    focal = total / weighted[0].numel()
    pt_sum = (p * tf).flatten(1).sum(1)
    t_sum = tf.flatten(1).sum(1)
    dice = 1 - (2 * pt_sum + eps) / (p.flatten(1).sum(1) + t_sum + eps)
    pred = up > 0
    inter = (pred & t).flatten(1).sum(1).float()
    union = (pred | t).flatten(1).sum(1).float()
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return focal, dice, iou


def _grad_logits(
    up: Tensor, t: Tensor, g_focal: Tensor, g_dice: Tensor, alpha: float, gamma: float, eps: float
) -> Tensor:
    """d(g_focal * focal + g_dice * dice) / d(upsampled logits), (K, H, W).

    With p = sigmoid(x), q = 1 - p_t (q = 1 - p where t = 1, p where t = 0), dq/dx = p (1 - p)
    (1 - 2t) and d ce/dx = p - t, each pixel's focal term a_t ce q^g has the derivative
    a_t ((p - t) q^g + g ce q^(g-1) dq/dx), averaged over the H*W pixels. Dice is
    1 - num/den with num = 2 sum(p t) + eps, den = sum(p) + sum(t) + eps, so
    d dice/dx = p (1 - p) (num - 2 t den) / den^2.
    """
    tf = t.float()
    p = torch.sigmoid(up)
    ce = F.binary_cross_entropy_with_logits(up, tf, reduction="none")
    q = torch.where(t, 1 - p, p)
    slope = p * (1 - p)
    per_pixel = (g_focal / up[0].numel()).reshape(-1, 1, 1)
    a_t = torch.where(t, alpha, 1 - alpha) if alpha >= 0 else torch.ones_like(p)
    focal_grad = a_t * ((p - tf) * q**gamma + gamma * ce * q ** (gamma - 1) * slope * (1 - 2 * tf))
    num = 2 * (p * tf).flatten(1).sum(1) + eps
    den = p.flatten(1).sum(1) + tf.flatten(1).sum(1) + eps
    dice_grad = slope * (num.reshape(-1, 1, 1) - 2 * tf * den.reshape(-1, 1, 1)) / (den**2).reshape(-1, 1, 1)
    return per_pixel * focal_grad + g_dice.reshape(-1, 1, 1) * dice_grad

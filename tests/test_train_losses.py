"""Loss functions against hand-computed values, and the min-over-multimask rule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from evsam_cli.train import losses
from evsam_cli.train.losses import (
    dice_loss,
    mask_iou,
    mask_loss,
    min_over_outputs,
    mse,
    sigmoid_focal_loss,
    upsampled_mask_losses,
)


def test_focal_loss_matches_hand_computation():
    logits = torch.tensor([[[0.0, 2.0]]])  # one 1x2 mask
    targets = torch.tensor([[[1.0, 0.0]]])
    # pixel 1: p = 0.5, target 1 -> 0.25 * (1 - 0.5)^2 * ln 2
    # pixel 2: p = sigmoid(2), target 0 -> 0.75 * p^2 * -ln(1 - p)
    p = 1 / (1 + math.exp(-2))
    expected = (0.25 * 0.25 * math.log(2) + 0.75 * p**2 * -math.log(1 - p)) / 2
    assert sigmoid_focal_loss(logits, targets).item() == pytest.approx(expected, rel=1e-6)
    assert sigmoid_focal_loss(logits, targets).shape == (1,)


def test_dice_loss_matches_hand_computation():
    logits = torch.tensor([[0.0, 0.0], [0.0, 0.0]])  # p = 0.5 everywhere
    targets = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    # 1 - (2 * 1.0 + 1) / (2.0 + 2.0 + 1)
    assert dice_loss(logits, targets).item() == pytest.approx(1 - 3 / 5)
    perfect = torch.tensor([[30.0, 30.0], [-30.0, -30.0]])
    assert dice_loss(perfect, targets).item() == pytest.approx(0.0, abs=1e-6)


def test_mask_loss_is_twenty_focal_plus_one_dice():
    torch.manual_seed(0)
    logits, targets = torch.randn(3, 2, 8, 8), (torch.rand(3, 2, 8, 8) > 0.5).float()
    expected = 20 * sigmoid_focal_loss(logits, targets) + dice_loss(logits, targets)
    torch.testing.assert_close(mask_loss(logits, targets), expected)
    assert mask_loss(logits, targets).shape == (3, 2)


def test_mse():
    assert mse(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0])).item() == pytest.approx(5.0)


def test_min_over_outputs_trains_only_the_best_output():
    logits = torch.zeros(2, 3, 4, 4, requires_grad=True)
    targets = torch.zeros(2, 3, 4, 4)
    with torch.no_grad():
        logits[0, 1] = -5  # output 1 of prompt 0 is the best (closest to the empty target)
        logits[1, 2] = -5
        logits[1, 0] = 3
    losses = mask_loss(logits, targets)
    best, index = min_over_outputs(losses)
    assert index.tolist() == [1, 2]
    best.sum().backward()
    grad_per_output = logits.grad.abs().sum(dim=(2, 3))
    assert grad_per_output[0, 1] > 0 and grad_per_output[1, 2] > 0
    assert grad_per_output[0, [0, 2]].sum() == 0 and grad_per_output[1, [0, 1]].sum() == 0


def test_mask_iou():
    logits = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    assert mask_iou(logits, targets).item() == pytest.approx(0.5)
    assert mask_iou(-logits.abs(), torch.zeros(2, 2)).item() == 1.0


@pytest.mark.parametrize("chunk_elements", [1 << 20, 40 * 40 * 2, 1])
def test_upsampled_mask_losses_equal_the_reference_and_its_gradient(monkeypatch, chunk_elements):
    """Fused upsample + focal + dice + IoU == the reference composition, values and gradient,
    whether masks go one, two or all at a time, and with outputs that get no gradient."""
    monkeypatch.setattr(losses, "_CPU_CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    logits = (torch.randn(4, 3, 16, 16) * 3).requires_grad_(True)
    targets = torch.rand(4, 40, 40) > 0.6
    targets[1] = False  # an empty target: Dice's eps and IoU's empty union
    up = F.interpolate(logits, (40, 40), mode="bilinear", align_corners=False)
    dense = targets.unsqueeze(1).float().expand_as(up)
    ref = (sigmoid_focal_loss(up, dense), dice_loss(up, dense), mask_iou(up.detach(), dense))
    weights = torch.randn(4, 3)
    weights[0] = 0  # prompt 0 trains nothing; the min-over-outputs rule zeroes two of three
    (ref_grad,) = torch.autograd.grad((20 * ref[0] * weights + ref[1] * weights).sum(), logits)

    focal, dice, iou = upsampled_mask_losses(logits, targets)
    (grad,) = torch.autograd.grad((20 * focal * weights + dice * weights).sum(), logits)
    torch.testing.assert_close(focal, ref[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dice, ref[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(iou, ref[2])
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-8)
    assert not iou.requires_grad
    assert grad[0].abs().sum() == 0


def test_upsampled_mask_losses_keep_the_logits_dtype_for_the_gradient():
    logits = torch.randn(2, 1, 8, 8, dtype=torch.bfloat16, requires_grad=True)
    focal, dice, _ = upsampled_mask_losses(logits, torch.rand(2, 16, 16) > 0.5)
    (focal + dice).sum().backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16
    assert focal.dtype == torch.float32

"""Inference-time rewrites of the image encoder that leave its outputs unchanged.

Applied to a *copy*: the model itself (its training path and saved weights) is never touched.

* BatchNorm folding: ``conv -> BN`` becomes one conv with scaled weights and a bias
  (exact up to float rounding), removing a full memory pass per BatchNorm.
* channels-last memory format: oneDNN's and cuDNN's convolutions are markedly faster on
  NHWC tensors, and no layout reorders happen between consecutive convs.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .layers import ConvNormAct


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv equal to ``bn(conv(x))`` in eval mode."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused


def fold_batchnorm_(module: nn.Module) -> int:
    """Fold every ``ConvNormAct`` BatchNorm into its conv, in place; returns how many were folded."""
    count = 0
    for m in module.modules():
        if isinstance(m, ConvNormAct) and isinstance(m.norm, nn.BatchNorm2d):
            m.conv = fold_conv_bn(m.conv, m.norm)
            m.norm = None
            count += 1
    return count


class ChannelsLast(nn.Module):
    """Runs ``module`` on channels-last input and returns a contiguous (NCHW) output."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.contiguous(memory_format=torch.channels_last)).contiguous()


def optimize_encoder(encoder: nn.Module, *, channels_last: bool = True) -> nn.Module:
    """An eval-mode copy of ``encoder`` with BatchNorm folded and channels-last layout.

    Returns ``encoder`` itself when there is nothing to gain (no BatchNorm to fold, e.g. SAM's
    ViTs, whose compute is matmuls), so no memory is spent on a copy.
    """
    if not any(isinstance(m, ConvNormAct) and isinstance(m.norm, nn.BatchNorm2d) for m in encoder.modules()):
        return encoder
    fast = copy.deepcopy(encoder).eval()
    for p in fast.parameters():
        p.requires_grad_(False)
    fold_batchnorm_(fast)
    return ChannelsLast(fast) if channels_last else fast

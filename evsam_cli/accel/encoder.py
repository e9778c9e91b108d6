"""Inference-time rewrites of the image encoder that leave its outputs unchanged.

Applied to a *copy*: the model itself (its training path and saved weights) is never touched.

* BatchNorm folding: ``conv -> BN`` becomes one conv with scaled weights and a bias
  (exact up to float rounding), removing a full memory pass per BatchNorm.
* channels-last memory format: oneDNN's and cuDNN's convolutions are markedly faster on
  NHWC tensors, and no layout reorders happen between consecutive convs.
* The neck's bicubic resizes as two small matmuls with the interpolation's own weights
  (``MatmulResize``), which also exports to ONNX as MatMuls: onnxruntime's cubic ``Resize``
  took a quarter of the exported encoder's time.
* CPU kernels (float32 on CPU only; ``cpu_kernels``):
  - the wide dense 3x3 convolutions (the SAM neck's and most fused MBConvs') run by
    Winograd's F(4x4, 3x3) (``accel/winograd.py``), a quarter of the multiplications;
  - every other conv runs as one oneDNN call with its activation fused in (GELU, exact or
    tanh) and its weight reordered once to oneDNN's blocked layout, instead of a conv, a
    weight reorder and a separate full pass for the activation.
  Both equal the plain path up to float rounding (``tests/test_optimize.py``).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ..models.layers import ConvNormAct, Upsample
from .winograd import WinogradConv2d, is_winograd_compatible

# Winograd pays for its transforms once convolutions are wide enough: the transforms' cost grows
# with the channels, not their product, and their memory traffic competes with the neighbouring
# layers'. Convolutions with 64 input channels, and 128 -> 128, stay direct oneDNN convolutions
# (measured per shape and inside the encoder: docs/benchmarks.md).
WINOGRAD_MIN_IN_CHANNELS = 128
WINOGRAD_MIN_CHANNEL_SUM = 384


def winograd_pays(conv: nn.Conv2d) -> bool:
    """Whether Winograd's F(4x4, 3x3) beats oneDNN's direct convolution for ``conv`` (CPU fp32)."""
    return (
        is_winograd_compatible(conv)
        and conv.in_channels >= WINOGRAD_MIN_IN_CHANNELS
        and conv.in_channels + conv.out_channels >= WINOGRAD_MIN_CHANNEL_SUM
    )


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv equal to ``bn(conv(x))`` in eval mode."""
    assert bn.running_var is not None and bn.running_mean is not None  # eval-mode statistics
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    # Built on the meta device: its weights are assigned below, so no random init is spent.
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]  # a 2-tuple for Conv2d, typed as any length
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        groups=conv.groups,
        bias=True,
        device="meta",
    )
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    dtype, grad = conv.weight.dtype, conv.weight.requires_grad  # as the conv, whatever BatchNorm's dtype
    fused.weight = nn.Parameter((conv.weight * scale.reshape(-1, 1, 1, 1)).to(dtype), requires_grad=grad)
    fused.bias = nn.Parameter(((bias - bn.running_mean) * scale + bn.bias).to(dtype), requires_grad=grad)
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


def bicubic_matrix(out_size: int, in_size: int) -> np.ndarray:
    """(out_size, in_size) float64 weights of 1-D bicubic resampling as PyTorch's
    ``F.interpolate(mode="bicubic", align_corners=False)`` computes it (Keys' kernel, a = -0.75,
    edge samples repeated); 2-D resizing is ``Wy @ x @ Wx.T``."""
    a = -0.75
    src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    base = np.floor(src)
    t = src - base
    near = lambda d: ((a + 2) * d - (a + 3)) * d * d + 1  # noqa: E731  |d| <= 1
    far = lambda d: ((a * d - 5 * a) * d + 8 * a) * d - 4 * a  # noqa: E731  1 < |d| < 2
    weights = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    for offset, w in ((-1, far(t + 1)), (0, near(t)), (1, near(1 - t)), (2, far(2 - t))):
        np.add.at(weights, (rows, np.clip(base.astype(np.int64) + offset, 0, in_size - 1)), w)
    return weights


@functools.lru_cache(maxsize=32)
def _bicubic_tensor(out_size: int, in_size: int, device: torch.device) -> torch.Tensor:
    """``bicubic_matrix`` as float32 on ``device``, made once (no host-to-device copy per call)."""
    return torch.from_numpy(bicubic_matrix(out_size, in_size)).float().to(device)


class MatmulResize(nn.Module):
    """``Upsample`` (bicubic to ``size`` x ``size``, computed in float32) as ``Wy @ x @ Wx.T``.

    Equal to it up to float rounding; the weights are constants of the input size, so a traced
    or exported graph holds them as two small initializers.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if (h, w) == (self.size, self.size):
            return x
        wy = _bicubic_tensor(self.size, int(h), x.device)
        wx = _bicubic_tensor(self.size, int(w), x.device)
        # NCHW first: on a channels-last input the broadcast matmul runs channel by channel.
        return (wy @ x.float().contiguous() @ wx.T).to(x.dtype)


def _replace_children_(module: nn.Module, replacement: Callable[[nn.Module], nn.Module | None]) -> int:
    """Swap every submodule of ``module`` for ``replacement(child)`` where that is not None, in
    place; returns how many were swapped."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            new = replacement(child)
            if new is not None:
                setattr(parent, name, new)
                count += 1
    return count


def use_matmul_resize_(module: nn.Module) -> int:
    """Replace every ``Upsample`` in ``module`` by ``MatmulResize``, in place; returns how many."""
    return _replace_children_(module, lambda m: MatmulResize(m.size) if isinstance(m, Upsample) else None)


class ChannelsLast(nn.Module):
    """Runs ``module`` on channels-last input and returns a contiguous (NCHW) output."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.contiguous(memory_format=torch.channels_last)).contiguous()


class FusedConvAct(nn.Module):
    """A conv and its activation as one oneDNN call (CPU, float32, no autograd).

    The weight is reordered to oneDNN's blocked layout on the first call and kept, and the
    activation (GELU, exact or tanh; ReLU) runs as a post-op on the output while it is still in
    cache. It runs in the weight's dtype (float32, or bf16 in ``precision.py``'s copies); anything
    else (another device, an input of another dtype, autograd) takes the plain conv + activation.
    """

    def __init__(self, conv: nn.Conv2d, act: nn.Module | None) -> None:
        super().__init__()
        post_op = _post_op(act)
        if post_op is None:
            raise ValueError(f"no fused form for activation {act}")
        self.conv = conv
        self.act = act
        self.attr, self.scalars, self.algorithm = post_op
        self._packed: torch.Tensor | None = None  # oneDNN-layout weight (not a buffer: opaque)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad)
        if x.device.type != "cpu" or x.dtype != conv.weight.dtype or needs_grad:
            y = conv(x)
            return y if self.act is None else self.act(y)
        args = ([*conv.padding], [*conv.stride], [*conv.dilation], conv.groups)
        if self._packed is None:
            self._packed = torch.ops.mkldnn._reorder_convolution_weight(conv.weight, *args, [*x.shape])
        return torch.ops.mkldnn._convolution_pointwise(
            x, self._packed, conv.bias, *args, self.attr, self.scalars, self.algorithm
        )


def _post_op(act: nn.Module | None) -> tuple[str, list, str] | None:
    """oneDNN's (attr, scalars, algorithm) for ``act`` as a conv post-op; None if it has none."""
    if act is None:
        return "none", [], ""
    if isinstance(act, nn.GELU):
        return "gelu", [None], act.approximate
    if isinstance(act, nn.ReLU):
        return "relu", [], ""
    return None


def _cpu_kernel(module: nn.Module) -> nn.Module | None:
    """The CPU-kernel form of a BatchNorm-free ``ConvNormAct``, or None for anything else."""
    if not isinstance(module, ConvNormAct) or module.norm is not None or _post_op(module.act) is None:
        return None
    conv = module.conv
    if winograd_pays(conv):
        return WinogradConv2d(conv, module.act)
    return FusedConvAct(conv, module.act)


def use_cpu_kernels_(module: nn.Module) -> int:
    """Replace each BatchNorm-free ``ConvNormAct`` in ``module`` by ``WinogradConv2d`` (wide dense
    3x3, stride 1) or ``FusedConvAct``, in place; returns how many were replaced."""
    return _replace_children_(module, _cpu_kernel)


def cpu_kernels_available() -> bool:
    """Whether this PyTorch build has the oneDNN ops ``FusedConvAct`` calls."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight")
    )


def optimize_encoder(
    encoder: nn.Module,
    *,
    channels_last: bool = True,
    cpu_kernels: bool | None = None,
    matmul_resize: bool = True,
) -> nn.Module:
    """An eval-mode copy of ``encoder`` with BatchNorm folded, matmul resizes and channels-last
    layout, and on CPU (float32) the Winograd and fused oneDNN convolutions (``cpu_kernels=None``:
    when the encoder's weights are float32 on the CPU and the build has the oneDNN ops).

    ``torch.compile`` callers pass ``cpu_kernels=False, matmul_resize=False``: inductor makes its
    own fused kernels, and the CPU kernels' opaque oneDNN weights and cached resize matrices are
    not for tracing.

    Returns ``encoder`` itself when there is nothing to gain (no BatchNorm to fold, e.g. SAM's
    ViTs, whose compute is matmuls), so no memory is spent on a copy. The copy is for inference
    on the device and dtype it was made for.
    """
    if not any(isinstance(m, ConvNormAct) and isinstance(m.norm, nn.BatchNorm2d) for m in encoder.modules()):
        return encoder
    fast = copy.deepcopy(encoder).eval()
    for p in fast.parameters():
        p.requires_grad_(False)
    fold_batchnorm_(fast)
    if matmul_resize:
        use_matmul_resize_(fast)
    if cpu_kernels is None:
        weight = next(fast.parameters())
        cpu_kernels = (
            weight.device.type == "cpu" and weight.dtype == torch.float32 and cpu_kernels_available()
        )
    if cpu_kernels:
        use_cpu_kernels_(fast)
    return ChannelsLast(fast) if channels_last else fast

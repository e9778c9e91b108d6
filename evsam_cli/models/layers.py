"""Building blocks of the EfficientViT backbone and the EfficientViT-SAM neck.

Attribute names (``conv``, ``norm``, ``op_list``, ``main``, ``spatial_conv`` ...) are the key
layout of the official mit-han-lab checkpoints, so those files load without any renaming.
All activations are passed as types; a missing norm or activation is ``None`` and simply absent
from the module (and from the state dict), exactly as in the released files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

# EfficientViT's large models use the tanh approximation of GELU.
GELUTanh: type[nn.Module] = partial(nn.GELU, approximate="tanh")  # type: ignore[assignment]

# The official EfficientViT-SAM registry sets eps=1e-6 on every BatchNorm/LayerNorm.
NORM_EPS = 1e-6


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of a (B, C, H, W) tensor.

    Computed in float32 whatever the input dtype: fp16 overflows in the variance otherwise.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused layer_norm over the channel axis of an NHWC view (several times faster than
        # the mean/var/normalise chain); the result stays channels-last in memory.
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        y = F.layer_norm(x.float().permute(0, 2, 3, 1), self.normalized_shape, weight, bias, self.eps)
        return y.permute(0, 3, 1, 2).to(x.dtype)


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=NORM_EPS)


class ConvNormAct(nn.Module):
    """Conv2d ("same" padding) -> optional BatchNorm -> optional activation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        groups: int = 1,
        bias: bool = False,
        norm: bool = True,
        act_layer: type[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=bias,
        )
        self.norm = batch_norm(out_channels) if norm else None
        self.act = act_layer() if act_layer is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.act is not None:
            x = self.act(x)
        return x


class OpSequential(nn.Module):
    """A sequence of modules stored under ``op_list`` (the official key layout)."""

    def __init__(self, ops: Sequence[nn.Module]) -> None:
        super().__init__()
        self.op_list = nn.ModuleList(ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for op in self.op_list:
            x = op(x)
        return x


class Residual(nn.Module):
    """``main(x) + x`` (``identity=True``) or just ``main(x)`` for a downsampling block."""

    def __init__(self, main: nn.Module, *, identity: bool = True) -> None:
        super().__init__()
        self.main = main
        self.shortcut = nn.Identity() if identity else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut is None:
            return self.main(x)
        return self.main(x) + x


class LocalBlock(nn.Module):
    """The constructor shared by EfficientViT's local blocks (ResBlock, FusedMBConv, MBConv).

    Each is a short chain of :class:`ConvNormAct` from ``in_channels`` through
    ``mid = round(in_channels * expand_ratio)`` channels to ``out_channels``; ``stride`` applies to
    its spatial conv. Every conv before the final projection carries ``act_layer``, and with
    ``fewer_norm`` a bias instead of BatchNorm; the projection has BatchNorm and no activation.
    Subclasses name their convs in :meth:`build` (the names are the checkpoint keys).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int = 1,
        expand_ratio: float = 1.0,
        act_layer: type[nn.Module],
        fewer_norm: bool = False,
    ) -> None:
        super().__init__()
        inner = partial(ConvNormAct, bias=fewer_norm, norm=not fewer_norm, act_layer=act_layer)
        self.build(in_channels, round(in_channels * expand_ratio), out_channels, stride=stride, inner=inner)

    def build(
        self, in_channels: int, mid: int, out_channels: int, *, stride: int, inner: Callable[..., ConvNormAct]
    ) -> None:
        """Create the convs; ``inner(c_in, c_out, kernel_size, ...)`` makes one before the projection."""
        raise NotImplementedError


class ResBlock(LocalBlock):
    """Two 3x3 convolutions (the stem's local block)."""

    def build(
        self, in_channels: int, mid: int, out_channels: int, *, stride: int, inner: Callable[..., ConvNormAct]
    ) -> None:
        self.conv1 = inner(in_channels, mid, 3, stride=stride)
        self.conv2 = ConvNormAct(mid, out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class FusedMBConv(LocalBlock):
    """Fused inverted residual: a full 3x3 expansion conv, then a 1x1 projection."""

    def build(
        self, in_channels: int, mid: int, out_channels: int, *, stride: int, inner: Callable[..., ConvNormAct]
    ) -> None:
        self.spatial_conv = inner(in_channels, mid, 3, stride=stride)
        self.point_conv = ConvNormAct(mid, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.point_conv(self.spatial_conv(x))


class MBConv(LocalBlock):
    """Inverted residual: 1x1 expansion, 3x3 depthwise, 1x1 projection."""

    def build(
        self, in_channels: int, mid: int, out_channels: int, *, stride: int, inner: Callable[..., ConvNormAct]
    ) -> None:
        self.inverted_conv = inner(in_channels, mid, 1)
        self.depth_conv = inner(mid, mid, 3, stride=stride, groups=mid)
        self.point_conv = ConvNormAct(mid, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.point_conv(self.depth_conv(self.inverted_conv(x)))


class MultiScaleAggregation(nn.Sequential):
    """Depthwise kxk conv then a grouped 1x1 conv (one group per head and q/k/v)."""

    def __init__(self, channels: int, kernel_size: int, groups: int) -> None:
        super().__init__(
            nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=False),
            nn.Conv2d(channels, channels, 1, groups=groups, bias=False),
        )


class LiteMLA(nn.Module):
    """Lightweight multi-scale linear attention (ReLU kernel) of EfficientViT.

    For ``N = H * W`` tokens and head dim ``d`` the cost is ``O(N d^2)`` instead of softmax
    attention's ``O(N^2 d)``: ``out = (V K^T) Q / (1^T K^T Q)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        head_dim: int = 32,
        scales: Sequence[int] = (5,),
        eps: float = 1e-15,
    ) -> None:
        super().__init__()
        heads = in_channels // head_dim
        total = heads * head_dim
        self.head_dim = head_dim
        self.eps = eps
        self.qkv = ConvNormAct(in_channels, 3 * total, 1, norm=False)
        self.aggreg = nn.ModuleList(MultiScaleAggregation(3 * total, k, 3 * heads) for k in scales)
        self.kernel_func = nn.ReLU()
        self.proj = ConvNormAct(total * (1 + len(scales)), out_channels, 1)

    def attention(self, qkv: torch.Tensor) -> torch.Tensor:
        """(B, heads*3*d, H, W) -> (B, heads*d, H, W); computed in float32 (fp16 overflows)."""
        b, _, h, w = qkv.shape
        dtype = qkv.dtype
        d = self.head_dim
        qkv = qkv.float().reshape(b, -1, 3 * d, h * w)
        q, k, v = qkv[:, :, :d], qkv[:, :, d : 2 * d], qkv[:, :, 2 * d :]
        q = self.kernel_func(q)
        k = self.kernel_func(k)
        if h * w > d:
            # Linear attention; the extra row of ones gives the normaliser in the same matmul.
            v = F.pad(v, (0, 0, 0, 1), value=1.0)
            out = (v @ k.transpose(-1, -2)) @ q
            out = out[:, :, :-1] / (out[:, :, -1:] + self.eps)
        else:
            # Fewer tokens than channels: the quadratic form is cheaper and mathematically equal.
            att = k.transpose(-1, -2) @ q
            att = att / (att.sum(dim=2, keepdim=True) + self.eps)
            out = v @ att
        return out.reshape(b, -1, h, w).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        qkv = torch.cat([qkv, *(op(qkv) for op in self.aggreg)], dim=1)
        return self.proj(self.attention(qkv))


class EfficientViTBlock(nn.Module):
    """LiteMLA (global context) followed by an MBConv (local), each with a residual."""

    def __init__(
        self,
        channels: int,
        *,
        head_dim: int,
        expand_ratio: float,
        scales: Sequence[int],
        act_layer: type[nn.Module],
    ) -> None:
        super().__init__()
        self.context_module = Residual(LiteMLA(channels, channels, head_dim=head_dim, scales=scales))
        self.local_module = Residual(
            MBConv(channels, channels, expand_ratio=expand_ratio, act_layer=act_layer, fewer_norm=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local_module(self.context_module(x))


class Upsample(nn.Module):
    """Bicubic resize to a fixed size, always in float32 (as the reference under autocast)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (self.size, self.size):
            return x
        dtype = x.dtype
        x = F.interpolate(x.float(), size=(self.size, self.size), mode="bicubic", align_corners=False)
        return x.to(dtype)

"""TinyViT image encoders as MobileSAM and LiteMedSAM use them (TinyViT-5M + SAM's neck).

TinyViT (Wu et al., ECCV 2022) is a stage of MBConv blocks followed by three stages of windowed
attention blocks with a learned relative-position bias. MobileSAM keeps every stage at a fixed
resolution of input/4, /8, /16, /16 (the last merge does not stride) and appends SAM's neck, so a
1024 px image becomes SAM's (256, 64, 64) embedding. LiteMedSAM keeps the architecture but swaps
the patch embedding for two 1x1 stride-1 conv-BN layers and feeds it 256 px images, which reach
64x64 after the same two strided merges.

Attribute names (``patch_embed.seq``, ``layers.N.blocks.M.attn.qkv``, ``c``/``bn`` of every
conv-BN pair, ``neck.0..3``, MobileSAM's unused ``norm_head``/``head``) are the official key
layout, so ``mobile_sam.pt`` and ``lite_medsam.pth`` load without renaming. Unlike the official
code, nothing here fixes the spatial size: stages pass (B, C, H, W) maps along and windows are
padded as needed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import LayerNorm2d


@dataclass(frozen=True)
class TinyViTConfig:
    embed_dims: tuple[int, ...]
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]  # per stage; stage 0 (MBConv) has no attention
    window_sizes: tuple[int, ...]
    merge_strides: tuple[int, ...]  # stride of the patch merging after stages 0..n-2


# TinyViT-5M as MobileSAM (and LiteMedSAM after it) configure it.
TINY_VIT_5M = TinyViTConfig(
    embed_dims=(64, 128, 160, 320),
    depths=(2, 2, 6, 2),
    num_heads=(2, 4, 5, 10),
    window_sizes=(7, 7, 14, 7),
    merge_strides=(2, 2, 1),
)


class ConvBN(nn.Sequential):
    """Conv2d without bias -> BatchNorm2d, as the official ``Conv2d_BN`` (keys ``c``, ``bn``)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 1, *, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__()
        self.c = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels)


class PatchEmbed(nn.Module):
    """(B, 3, H, W) -> (B, embed_dim, H / stride**2, W / stride**2): two conv-BN layers with GELU.

    MobileSAM: ``kernel_size=3, stride=2`` (input/4); LiteMedSAM: ``kernel_size=1, stride=1``.
    """

    def __init__(self, *, in_channels: int, embed_dim: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            ConvBN(in_channels, embed_dim // 2, kernel_size, stride=stride),
            nn.GELU(),
            ConvBN(embed_dim // 2, embed_dim, kernel_size, stride=stride),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, residual, then GELU."""

    def __init__(self, channels: int, *, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(channels * expand_ratio)
        self.conv1 = ConvBN(channels, hidden)
        self.act1 = nn.GELU()
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = ConvBN(hidden, channels)
        self.act3 = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        y = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.act3(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """(B, dim, H, W) -> (B, out_dim, H / stride, W / stride): 1x1, depthwise 3x3 (strided), 1x1."""

    def __init__(self, dim: int, out_dim: int, *, stride: int) -> None:
        super().__init__()
        self.act = nn.GELU()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride=stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention over the tokens of one window, with a learned bias per head
    for every (|dy|, |dx|) offset between two positions of the window (LeViT's attention bias).

    (B, N, dim) -> (B, N, dim), N = window_size**2; the input is layer-normalised first.
    """

    def __init__(self, dim: int, *, num_heads: int, window_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        points = list(itertools.product(range(window_size), range(window_size)))
        offsets: dict[tuple[int, int], int] = {}
        idxs = []
        for p1 in points:
            for p2 in points:
                offset = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
                idxs.append(offsets.setdefault(offset, len(offsets)))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, len(offsets)))
        n = len(points)
        self.register_buffer(
            "attention_bias_idxs", torch.tensor(idxs, dtype=torch.long).view(n, n), persistent=False
        )
        self.attention_bias_idxs: Tensor

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        # Per head the projection holds [q | k | v] side by side (the official split).
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.permute(0, 2, 1, 3).split(self.head_dim, dim=-1)
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.attention_biases[:, self.attention_bias_idxs]
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(x)


class Mlp(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear on (..., dim)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Windowed attention (residual), depthwise 3x3 conv-BN, MLP (residual); (B, C, H, W) in
    and out. Maps whose sides are not multiples of the window are zero-padded bottom/right for
    the attention, as in the official code (padded tokens take part as keys)."""

    def __init__(self, dim: int, *, num_heads: int, window_size: int, mlp_ratio: float) -> None:
        super().__init__()
        self.window_size = window_size
        self.attn = Attention(dim, num_heads=num_heads, window_size=window_size)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = ConvBN(dim, dim, 3, groups=dim)

    def window_attention(self, x: Tensor) -> Tensor:
        """(B, H, W, C) -> (B, H, W, C) attention within non-overlapping windows."""
        b, h, w, c = x.shape
        ws = self.window_size
        pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        ph, pw = h + pad_b, w + pad_r
        nh, nw = ph // ws, pw // ws
        windows = x.reshape(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        out = self.attn(windows)
        out = out.reshape(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)
        return out[:, :h, :w] if pad_b or pad_r else out

    def forward(self, x: Tensor) -> Tensor:
        t = x.permute(0, 2, 3, 1)
        t = t + self.window_attention(t)
        t = self.local_conv(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        t = t + self.mlp(t)
        return t.permute(0, 3, 1, 2)


class ConvStage(nn.Module):
    """Stage 0: MBConv blocks, then an optional patch merging."""

    def __init__(self, dim: int, *, depth: int, expand_ratio: float, downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([MBConv(dim, expand_ratio=expand_ratio) for _ in range(depth)])
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class AttentionStage(nn.Module):
    """Stages 1..n: TinyViT blocks, then an optional patch merging."""

    def __init__(
        self,
        dim: int,
        *,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        downsample: PatchMerging | None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                TinyViTBlock(dim, num_heads=num_heads, window_size=window_size, mlp_ratio=mlp_ratio)
                for _ in range(depth)
            ]
        )
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class TinyViTSamImageEncoder(nn.Module):
    """TinyViT + SAM's neck: (B, 3, S, S) -> (B, 256, 64, 64).

    ``S`` is 1024 with MobileSAM's patch embedding (3x3, stride 2) and 256 with LiteMedSAM's
    (1x1, stride 1); other sizes give a proportionally different embedding size.
    """

    def __init__(
        self,
        config: TinyViTConfig,
        *,
        patch_kernel_size: int,
        patch_stride: int,
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        out_chans: int = 256,
        num_classes: int = 0,
    ) -> None:
        """
        Args:
          config: stage widths, depths, heads, windows and merge strides.
          patch_kernel_size / patch_stride: of both patch-embedding convs (see ``PatchEmbed``).
          mlp_ratio: MLP hidden width / block width in the attention stages.
          mbconv_expand_ratio: hidden width / width of the MBConv blocks.
          out_chans: channels of the neck (SAM's embedding).
          num_classes: > 0 adds TinyViT's ImageNet classifier (``norm_head``, ``head``). It is
            never run; MobileSAM's release carries it, so it exists for strict loading only.
        """
        super().__init__()
        dims = config.embed_dims
        self.patch_embed = PatchEmbed(
            in_channels=3, embed_dim=dims[0], kernel_size=patch_kernel_size, stride=patch_stride
        )
        self.layers = nn.ModuleList()
        for i, (dim, depth) in enumerate(zip(dims, config.depths, strict=True)):
            last = i == len(dims) - 1
            merge = None if last else PatchMerging(dim, dims[i + 1], stride=config.merge_strides[i])
            if i == 0:
                stage: nn.Module = ConvStage(
                    dim, depth=depth, expand_ratio=mbconv_expand_ratio, downsample=merge
                )
            else:
                stage = AttentionStage(
                    dim,
                    depth=depth,
                    num_heads=config.num_heads[i],
                    window_size=config.window_sizes[i],
                    mlp_ratio=mlp_ratio,
                    downsample=merge,
                )
            self.layers.append(stage)
        if num_classes > 0:
            self.norm_head = nn.LayerNorm(dims[-1])
            self.head = nn.Linear(dims[-1], num_classes)
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans, eps=1e-6),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans, eps=1e-6),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.neck(x)


def build_tiny_vit_sam(
    *, patch_kernel_size: int, patch_stride: int, num_classes: int = 0
) -> TinyViTSamImageEncoder:
    """TinyViT-5M with SAM's neck (MobileSAM: 3/2 with the 1000-class head; LiteMedSAM: 1/1)."""
    return TinyViTSamImageEncoder(
        TINY_VIT_5M, patch_kernel_size=patch_kernel_size, patch_stride=patch_stride, num_classes=num_classes
    )

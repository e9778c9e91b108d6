"""3x3 convolutions by Winograd's minimal filtering algorithm F(4x4, 3x3) (Lavin & Gray, 2016).

A stride-1 3x3 convolution computes each 4x4 block of output pixels from a 6x6 block of input
pixels. Winograd's algorithm does that with 36 multiplications per (input, output) channel pair
instead of 144: the input tile and the 3x3 filter are taken to a 6x6 "transformed" domain by
fixed matrices (``B``, ``G``), multiplied elementwise there, and taken back (``A``). Summed over
the input channels, the elementwise products become 36 independent matrix products
``(tiles x C_in) @ (C_in x C_out)``, one per transformed position: a 4x cut in arithmetic,
spent in a few cheap linear passes over the tiles.

The result is the same convolution up to float rounding (the transforms' constants 1/6, 1/24,
8 ... make it a little larger than direct convolution's: about 1e-5 of the output scale in
fp32). oneDNN has no fp32 Winograd on x86, and on a CPU the encoder's wide 3x3 convolutions
(the SAM neck's 256-channel fused MBConvs at 64x64) are its most expensive operations, so
``models/optimize.py`` swaps them for this module in the CPU inference copy of the encoder.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

# Lavin & Gray's F(4x4, 3x3) matrices: output = A^T [(G g G^T) * (B^T d B)] A.
_BT = (
    (4, 0, -5, 0, 1, 0),
    (0, -4, -4, 1, 1, 0),
    (0, 4, -4, -1, 1, 0),
    (0, -2, -1, 2, 1, 0),
    (0, 2, -1, -2, 1, 0),
    (0, 4, 0, -5, 0, 1),
)
_G = (
    (1 / 4, 0, 0),
    (-1 / 6, -1 / 6, -1 / 6),
    (-1 / 6, 1 / 6, -1 / 6),
    (1 / 24, 1 / 12, 1 / 6),
    (1 / 24, -1 / 12, 1 / 6),
    (0, 0, 1),
)
_AT = (
    (1, 1, 1, 1, 1, 0),
    (0, 1, -1, 2, -2, 0),
    (0, 1, 1, 4, 4, 0),
    (0, 1, -1, 8, -8, 1),
)
TILE = 4  # output pixels per tile side
ALPHA = TILE + 2  # input pixels per tile side


@functools.lru_cache(maxsize=8)
def _transforms(dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """B^T (x) B^T (36, 36) and A^T (x) A^T (16, 36): the tile transforms as one matrix each,
    acting on a tile flattened row by row."""
    bt = torch.tensor(_BT, dtype=torch.float64)
    at = torch.tensor(_AT, dtype=torch.float64)
    return torch.kron(bt, bt).to(dtype=dtype, device=device), torch.kron(at, at).to(
        dtype=dtype, device=device
    )


def transform_filters(weight: Tensor) -> Tensor:
    """3x3 filters (C_out, C_in, 3, 3) -> the transformed domain (36, C_in, C_out), in float64
    first so the only rounding is the final cast to ``weight``'s dtype."""
    g = torch.tensor(_G, dtype=torch.float64, device=weight.device)
    u = torch.einsum("ai,kcij,bj->abck", g, weight.double(), g)
    return u.reshape(ALPHA * ALPHA, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


def winograd_conv3x3(x: Tensor, filters: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a dense 3x3 kernel by F(4x4, 3x3).

    Args:
      x: (B, C_in, H, W), any memory format (channels-last avoids one copy).
      filters: ``transform_filters(weight)``, (36, C_in, C_out).
      bias: (C_out,) or None.
    Returns:
      (B, C_out, H, W) in channels-last memory format.
    """
    b, c, h, w = x.shape
    k = filters.shape[2]
    th, tw = -(-h // TILE), -(-w // TILE)
    # Zero-padded NHWC input covering whole tiles (the conv's own padding of 1 included).
    hp, wp = TILE * th + 2, TILE * tw + 2
    padded = x.new_zeros(b, hp, wp, c)
    padded[:, 1 : h + 1, 1 : w + 1] = x.permute(0, 2, 3, 1)
    # Overlapping 6x6 tiles with stride 4, laid out (36 positions, tiles * C_in) in one copy.
    tiles = padded.as_strided(
        (ALPHA, ALPHA, b, th, tw, c), (wp * c, c, hp * wp * c, TILE * wp * c, TILE * c, 1)
    ).reshape(ALPHA * ALPHA, -1)
    input_transform, output_transform = _transforms(x.dtype, x.device)
    v = torch.mm(input_transform, tiles).view(ALPHA * ALPHA, -1, c)  # B^T d B per tile
    m = torch.bmm(v, filters)  # (36, tiles, C_out): the channel sums, one matmul per position
    y = torch.mm(output_transform, m.view(ALPHA * ALPHA, -1))  # A^T m A: (16, tiles * C_out)
    y = y.view(TILE, TILE, b, th, tw, k).permute(2, 3, 0, 4, 1, 5)  # (B, th, 4, tw, 4, C_out)
    out = x.new_empty(b, TILE * th, TILE * tw, k)
    if bias is None:
        out.view(b, th, TILE, tw, TILE, k).copy_(y)
    else:
        torch.add(y, bias, out=out.view(b, th, TILE, tw, TILE, k))
    out = out[:, :h, :w].permute(0, 3, 1, 2)
    return out.contiguous(memory_format=torch.channels_last)


class WinogradConv2d(nn.Module):
    """An inference-only replacement for a dense, stride-1, 3x3 ``nn.Conv2d`` (padding 1),
    optionally followed by an activation (applied in place to the fresh output)."""

    def __init__(self, conv: nn.Conv2d, act: nn.Module | None = None) -> None:
        super().__init__()
        if not is_winograd_compatible(conv):
            raise ValueError(f"not a dense stride-1 3x3 convolution with padding 1: {conv}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.register_buffer("filters", transform_filters(conv.weight.detach()))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        y = winograd_conv3x3(x, self.filters, self.bias)
        if isinstance(self.act, nn.GELU):
            return torch.ops.aten.gelu_(y, approximate=self.act.approximate)
        return y if self.act is None else self.act(y)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=(3, 3), F(4x4, 3x3)"


def is_winograd_compatible(conv: nn.Module) -> bool:
    """Whether ``conv`` is a convolution ``WinogradConv2d`` can replace."""
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )

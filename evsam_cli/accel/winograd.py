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
``accel/encoder.py`` swaps them for this module in the CPU inference copy of the encoder.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

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


# Tile rows are processed in chunks whose transformed outputs (36 x tiles x C_out floats) stay
# within this many bytes: glibc serves larger blocks from fresh mmap pages (above 32 MiB even with
# ``tune_cpu_allocator``), whose page faults cost more than the work they hold, and a chunk's
# intermediates are still in cache when the next step reads them. Each chunk reads all the
# transformed filters, so ``WinogradConv2d`` never makes chunks smaller than those (the neck's
# 256 -> 1024 has 38 MB of them and runs in one piece).
CHUNK_BYTES = 32 << 20


def winograd_conv3x3(
    x: Tensor,
    filters: Tensor,
    bias: Tensor | None = None,
    *,
    epilogue: Callable[[Tensor], object] | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a dense 3x3 kernel by F(4x4, 3x3).

    Args:
      x: (B, C_in, H, W), any memory format (channels-last avoids one copy).
      filters: ``transform_filters(weight)``, (36, C_in, C_out).
      bias: (C_out,) or None.
      epilogue: an in-place elementwise function (an activation) applied to each chunk of output
        rows as soon as it is written, while it is still in cache.
      chunk_bytes: the largest transformed output of one chunk of tile rows (at least one row).
    Returns:
      (B, C_out, H, W) in channels-last memory format.
    """
    b, c, h, w = x.shape
    k = filters.shape[2]
    th, tw = -(-h // TILE), -(-w // TILE)
    wp = TILE * tw + 2
    pixels = x.permute(0, 2, 3, 1)  # NHWC (a view for channels-last input)
    input_transform, output_transform = _transforms(x.dtype, x.device)
    out = x.new_empty(b, TILE * th, TILE * tw, k)
    row_bytes = ALPHA * ALPHA * b * tw * k * x.element_size()
    chunks = -(-th * row_bytes // chunk_bytes)
    rows = -(-th // chunks)  # tile rows per chunk, balanced
    for r0 in range(0, th, rows):
        nr = min(rows, th - r0)
        y0, hp = TILE * r0, TILE * nr + 2
        # Zero-padded input rows y0 - 1 ... y0 + 4 nr (the conv's own padding of 1 included).
        padded = x.new_zeros(b, hp, wp, c)
        top, bottom = max(y0 - 1, 0), min(y0 + hp - 1, h)
        padded[:, top - y0 + 1 : bottom - y0 + 1, 1 : w + 1] = pixels[:, top:bottom]
        # Overlapping 6x6 tiles with stride 4, laid out (36 positions, tiles * C_in) in one copy.
        tiles = padded.as_strided(
            (ALPHA, ALPHA, b, nr, tw, c), (wp * c, c, hp * wp * c, TILE * wp * c, TILE * c, 1)
        ).reshape(ALPHA * ALPHA, -1)
        v = torch.mm(input_transform, tiles).view(ALPHA * ALPHA, -1, c)  # B^T d B per tile
        m = torch.bmm(v, filters)  # (36, tiles, C_out): the channel sums, one matmul per position
        y = torch.mm(output_transform, m.view(ALPHA * ALPHA, -1))  # A^T m A: (16, tiles * C_out)
        y = y.view(TILE, TILE, b, nr, tw, k).permute(2, 3, 0, 4, 1, 5)  # (B, nr, 4, tw, 4, C_out)
        block = out[:, y0 : y0 + TILE * nr]
        if bias is None:
            block.view(b, nr, TILE, tw, TILE, k).copy_(y)
        else:
            torch.add(y, bias, out=block.view(b, nr, TILE, tw, TILE, k))
        if epilogue is not None:
            epilogue(block)
    out = out[:, :h, :w].permute(0, 3, 1, 2)
    return out.contiguous(memory_format=torch.channels_last)


class WinogradConv2d(nn.Module):
    """An inference-only replacement for a dense, stride-1, 3x3 ``nn.Conv2d`` (padding 1),
    optionally followed by an activation (applied in place to the fresh output)."""

    filters: Tensor
    bias: Tensor | None

    def __init__(self, conv: nn.Conv2d, act: nn.Module | None = None) -> None:
        super().__init__()
        if not is_winograd_compatible(conv):
            raise ValueError(f"not a dense stride-1 3x3 convolution with padding 1: {conv}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.register_buffer("filters", transform_filters(conv.weight.detach()))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())
        self.act = act
        self.epilogue = _in_place(act)
        # Each chunk reads all the filters: no point in chunks smaller than those.
        self.chunk_bytes = max(CHUNK_BYTES, self.filters.numel() * self.filters.element_size())

    def forward(self, x: Tensor) -> Tensor:
        assert isinstance(self.filters, Tensor)
        y = winograd_conv3x3(x, self.filters, self.bias, epilogue=self.epilogue, chunk_bytes=self.chunk_bytes)
        if self.act is None or self.epilogue is not None:
            return y
        return self.act(y)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=(3, 3), F(4x4, 3x3)"


def _in_place(act: nn.Module | None) -> Callable[[Tensor], object] | None:
    if isinstance(act, nn.GELU):
        return functools.partial(torch.ops.aten.gelu_, approximate=act.approximate)
    if isinstance(act, nn.ReLU):
        return torch.relu_
    return None


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

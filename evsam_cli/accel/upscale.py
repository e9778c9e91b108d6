"""Mask logits from the decoder's low-res grid to the original image: as logits, or thresholded.

SAM upsamples the decoder's (256 x 256) logits bilinearly to its 1024 prompt frame, crops the
image out of it and resizes that to the original size, bilinearly again. ``upscale_logits``
does exactly that (identical values), computing only the part of the frame the crop reads.

Most callers only want ``logits > 0``, which ``upscale_binary`` computes in one of two ways,
both faster on a CPU than SAM's two full-size ``F.interpolate`` passes and equal to thresholding ``upscale_logits`` except possibly at pixels whose
logit is within float rounding of 0:

* Banded products. The two resizes compose into one matrix per axis with at most 3 taps a row,
  so blocks of output rows (then columns) are small matrix products with the slice of low-res
  pixels they read (``_bands``), thresholded block by block, with no 1024-frame intermediate.
  Used for images up to the prompt frame's size.
* The sign rule, for larger images, where writing every float costs more than deciding most
  pixels without one. Both resizes have non-negative weights, so every output pixel is a
  convex combination of at most 3 x 3 neighbouring low-res logits: where those are all
  positive the output is positive, where they are all <= 0 it is <= 0. Pixels are decided from
  a 3x3 min/max of the low-res grid, and only those whose neighbourhood changes sign (near the
  outline) are computed, from their 9 logits and the composed weights. Masks with long outlines
  (noise-like logits of untrained weights) go back to the banded products.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.frames import upscale_bands, upscale_matrix

# A logit above this is positive after any convex combination, without underflow to 0.
_POSITIVE = 1e-30
# Above this share of output pixels to compute one by one, the banded dense resize is faster.
_DENSE_FRACTION = 0.03
# Output rows/columns per block of the banded dense resize (``_bands``).
_BAND_BLOCK = 64


def upscale_logits(
    masks: Tensor, input_size: tuple[int, int], original_size: tuple[int, int], prompt_size: int
) -> Tensor:
    """Low-res logits (N, M, h, w) -> logits at the original image size (N, M, H, W).

    The image occupies ``input_size`` (h, w) of the ``prompt_size`` frame. SAM upsamples to the
    whole frame and then crops; here the low-res rows and columns that the crop reads are cut
    first and upsampled with the same scale (x4, the same weights), which gives identical
    values without computing the padding part of the frame (25% of it for a 4:3 image).
    """
    scale = prompt_size // masks.shape[-1]
    if scale * masks.shape[-1] == prompt_size:
        rows, cols = (min(masks.shape[d], -(-input_size[i] // scale) + 1) for i, d in ((0, -2), (1, -1)))
        masks = F.interpolate(
            masks[..., :rows, :cols], scale_factor=float(scale), mode="bilinear", align_corners=False
        )
    else:
        masks = F.interpolate(masks, (prompt_size, prompt_size), mode="bilinear", align_corners=False)
    masks = masks[..., : input_size[0], : input_size[1]]
    return F.interpolate(masks, original_size, mode="bilinear", align_corners=False)


def upscale_binary(
    masks: Tensor, input_size: tuple[int, int], original_size: tuple[int, int], prompt_size: int
) -> Tensor:
    """``upscale_logits(masks, ...) > 0`` as bool (N, M, H, W) (see the module doc): the banded
    dense resize for images up to the prompt frame's size or masks with long outlines, the
    low-res sign rule for larger images. On a GPU, where the dense resize is cheap, it is simply
    that."""
    if masks.device.type != "cpu":
        return upscale_logits(masks, input_size, original_size, prompt_size) > 0
    if original_size[0] * original_size[1] > prompt_size**2:
        out = _sign_rule(masks, input_size, original_size, prompt_size)
        if out is not None:
            return out
    return _banded_binary(masks, input_size, original_size, prompt_size)


def _sign_rule(
    masks: Tensor, input_size: tuple[int, int], original_size: tuple[int, int], prompt_size: int
) -> Tensor | None:
    """``upscale_binary`` by the sign rule (see the module doc); None where the banded products
    are the better choice (long outlines) or the only one (an output pixel reads a wider window
    than 3 x 3, not the case for SAM's sizes)."""
    n, m, h, w = masks.shape
    taps_y = _axis_taps(h, prompt_size, input_size[0], original_size[0])
    taps_x = _axis_taps(w, prompt_size, input_size[1], original_size[1])
    if taps_y is None or taps_x is None:
        return None
    # Along each axis output pixels come in runs that read the same 3-pixel window of low-res
    # pixels (``_Taps``); the windows start at low-res rows 0 .. rows-1 and columns 0 .. cols-1.
    rows, cols = len(taps_y.first), len(taps_x.first)
    low = masks.reshape(n * m, h, w).float()[:, : rows + 2, : cols + 2]
    pad_y, pad_x = rows + 2 - low.shape[1], cols + 2 - low.shape[2]
    if pad_y or pad_x:  # replicated edges leave a window's min and max alone; their weights are 0
        low = F.pad(low[:, None], (0, pad_x, 0, pad_y), mode="replicate")[:, 0]
    high = _window3(low, torch.maximum)  # (B, rows, cols): max of each 3x3 window
    positive = _window3(low, torch.minimum) > _POSITIVE  # every logit of the window > 0
    mixed = positive ^ (high > 0)  # windows whose signs differ
    # Output pixels reading those windows, counted before listing them (nonzero is not free).
    pixels = taps_y.count.to(low.dtype) @ mixed.to(low.dtype).sum(0) @ taps_x.count.to(low.dtype)
    if float(pixels) > _DENSE_FRACTION * n * m * original_size[0] * original_size[1]:
        return None  # long outlines (noise-like logits of untrained weights)
    b, r, c = mixed.nonzero().unbind(1)
    pixels = taps_y.count[r] * taps_x.count[c]
    b, r, c = b[pixels > 0], r[pixels > 0], c[pixels > 0]
    # Each output pixel takes its window's sign; columns first, so both gathers copy whole rows.
    out = positive.transpose(1, 2).index_select(1, taps_x.run).transpose(1, 2).contiguous()
    out = out.index_select(1, taps_y.run)
    if b.numel():
        patch = torch.stack([low[b, r + i, c + j] for i in range(3) for j in range(3)], 1).double()
        logits = taps_y.block_weight[r] @ patch.view(-1, 3, 3) @ taps_x.block_weight[c].transpose(1, 2)
        dy, dx = torch.meshgrid(torch.arange(logits.shape[1]), torch.arange(logits.shape[2]), indexing="ij")
        valid = (dy < taps_y.count[r, None, None]) & (dx < taps_x.count[c, None, None])
        y = (taps_y.first[r, None, None] + dy)[valid]
        x = (taps_x.first[c, None, None] + dx)[valid]
        out[b[:, None, None].expand_as(valid)[valid], y, x] = logits[valid] > 0
    return out.view(n, m, *original_size)


@functools.lru_cache(maxsize=64)
def read_extent(low: int, frame: int, image: int, out: int) -> int:
    """How many leading low-res pixels of one axis (of ``low``) the upscaling to ``out`` pixels
    weighs, for an image spanning ``image`` of the ``frame``: the rest may hold any finite value
    (zeros, say) without changing ``upscale_logits`` or ``upscale_binary`` (the sign rule's
    windows may reach one pixel further, but only its exact path then reads it, with weight 0).
    That is the furthest low-res pixel any block of the banded products reads (``_bands``)."""
    return max(band.hi for band in _bands(low, frame, image, out))


def _banded_binary(
    masks: Tensor, input_size: tuple[int, int], original_size: tuple[int, int], prompt_size: int
) -> Tensor:
    """``upscale_logits(...) > 0`` for every pixel, as banded products (see the module doc): per
    block of output rows, along y on the low-res grid, then along x block by block, thresholding
    each block while the block row is still in cache."""
    n, m, h, w = masks.shape
    rows = _bands(h, prompt_size, input_size[0], original_size[0])
    cols = _bands(w, prompt_size, input_size[1], original_size[1])
    low = masks.reshape(n * m, h, w).float()
    first, last = cols[0].lo, cols[-1].hi  # the low-res columns any output reads
    low = low[:, :, first:last]
    out = torch.empty(n * m, *original_size, dtype=torch.bool)
    for row in rows:
        tall = row.weight @ low[:, row.lo : row.hi]  # (B, block rows, w')
        for col in cols:
            block = tall[:, :, col.lo - first : col.hi - first] @ col.weight.T
            torch.gt(block, 0, out=out[:, row.start : row.stop, col.start : col.stop])
    return out.view(n, m, *original_size)


@dataclass(frozen=True)
class _Band:
    """Output pixels ``start:stop`` of one axis read only low-res pixels ``lo:hi``, with
    ``weight`` (stop - start, hi - lo) float32."""

    start: int
    stop: int
    lo: int
    hi: int
    weight: Tensor


@functools.lru_cache(maxsize=64)
def _bands(low: int, frame: int, image: int, out: int) -> tuple[_Band, ...]:
    """One axis of the composed upscaling in blocks of ``_BAND_BLOCK`` output pixels
    (``frames.upscale_bands``)."""
    return tuple(
        _Band(start, stop, lo, hi, torch.from_numpy(weight).float())
        for start, stop, lo, hi, weight in upscale_bands(image, out, frame, low, _BAND_BLOCK)
    )


def _window3(x: Tensor, op: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """``op``-reduction (max or min) of each 3x3 window of (B, H, W) -> (B, H - 2, W - 2)."""
    x = op(op(x[:, :-2], x[:, 1:-1]), x[:, 2:])
    return op(op(x[:, :, :-2], x[:, :, 1:-1]), x[:, :, 2:])


@dataclass(frozen=True)
class _Taps:
    """One axis of the two resizes composed (see ``_axis_taps``)."""

    run: Tensor  # (out,) the low-res window (its first pixel) each output pixel reads
    first: Tensor  # (R,) first output pixel reading window r (windows 0 .. R-1)
    count: Tensor  # (R,) how many output pixels read it (0 for a window nobody reads)
    block_weight: Tensor  # (R, max count, 3) float64: their weights on the window's 3 pixels


@functools.lru_cache(maxsize=64)
def _axis_taps(low: int, frame: int, image: int, out: int) -> _Taps | None:
    """The upscaling along one axis: low-res (``low``) -> prompt frame (``frame``), cropped to
    the image (``image``) -> original size (``out``), as runs of output pixels that read the same
    3-pixel window. None if some output pixel reads a wider window (not the case for SAM's
    sizes; callers then resize densely)."""
    matrix = upscale_matrix(image, out, frame, low)  # (out, low), <= 3 taps a row
    nonzero = matrix != 0
    run = nonzero.argmax(axis=1)  # first low-res pixel each output pixel reads
    last = low - 1 - nonzero[:, ::-1].argmax(axis=1)
    if (last - run).max() > 2:
        return None
    windows = int(run[-1]) + 1
    count = np.bincount(run, minlength=windows)
    first = np.searchsorted(run, np.arange(windows))
    padded = np.pad(matrix, ((0, 0), (0, 2)))
    weight = padded[np.arange(out)[:, None], run[:, None] + np.arange(3)]  # (out, 3)
    block = np.zeros((windows, max(int(count.max()), 1), 3))
    for k in range(block.shape[1]):  # the k-th output pixel of every run
        has = count > k
        block[has, k] = weight[first[has] + k]
    return _Taps(*(torch.from_numpy(a) for a in (run, first, count, block)))

"""Overlay pictures of masks, boxes and clicks (PIL only)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw


def palette(n: int, seed: int = 0) -> np.ndarray:
    """``n`` distinct, saturated RGB colours (golden-ratio hues), (n, 3) uint8."""
    import colorsys

    rng = np.random.default_rng(seed)
    offset = rng.random()
    colors = [colorsys.hsv_to_rgb((offset + i * 0.618033988749895) % 1.0, 0.75, 1.0) for i in range(n)]
    return (np.array(colors, dtype=np.float64).reshape(-1, 3) * 255).astype(np.uint8)


def overlay_masks(
    image: np.ndarray,
    masks: Sequence[np.ndarray] | np.ndarray,
    *,
    boxes: Sequence[Sequence[float]] | None = None,
    points: Sequence[Sequence[float]] | None = None,
    point_labels: Sequence[int] | None = None,
    alpha: float = 0.5,
    draw_outline: bool = True,
) -> Image.Image:
    """Blend each boolean (H, W) mask in its own colour over an HxWx3 uint8 image.

    Boxes (xyxy) are drawn in the colour of the mask with the same index; points are drawn as
    green (positive) or red (negative) dots.
    """
    out = image.astype(np.float32).copy()
    colors = palette(max(len(masks), 1))
    for mask, color in zip(masks, colors, strict=False):
        m = np.asarray(mask, dtype=bool)
        out[m] = out[m] * (1 - alpha) + color.astype(np.float32) * alpha
        if draw_outline:
            edge = m & ~(
                np.pad(m, 1)[2:, 1:-1]
                & np.pad(m, 1)[:-2, 1:-1]
                & np.pad(m, 1)[1:-1, 2:]
                & np.pad(m, 1)[1:-1, :-2]
            )
            out[edge] = color
    img = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    width = max(1, round(max(image.shape[:2]) / 300))
    for i, box in enumerate(boxes or []):
        color = tuple(int(c) for c in colors[i % len(colors)])
        draw.rectangle([float(v) for v in box], outline=color, width=width)
    r = max(3, round(max(image.shape[:2]) / 120))
    for j, (x, y) in enumerate(points or []):
        positive = point_labels is None or int(point_labels[j]) == 1
        fill = (40, 220, 60) if positive else (230, 40, 40)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=(255, 255, 255), width=max(1, r // 3))
    return img

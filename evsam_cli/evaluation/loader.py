"""Image decoding and ground-truth preparation, in reader threads ahead of the model.

Each item is the image read and resized for the encoder (longest side = the model's input size,
PIL bilinear, as ``Sam.resize_image``) and, for box/point prompts, its decoded ground-truth
masks. An image that cannot be read becomes an item with an ``error`` for the runner to skip
and report.

``read_batches`` reads in threads rather than DataLoader processes. A forked worker shares the
evaluating process's memory copy-on-write, so for as long as it lives every heap page that the
model writes again (its activations reuse freed blocks every pass) costs a page fault and a
copy: the kernel time this adds outweighs what the workers save (docs/benchmarks.md). Decoding a
JPEG and resizing it with PIL release the GIL, so threads overlap with the model just as well.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Generator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.frames import resize_longest
from ..data.images import load_image
from ..errors import DataError
from .datasets import EvalImage, annotation_to_mask, bbox_xywh_to_xyxy


@dataclass
class EvalItem:
    index: int  # position in the evaluated image list
    image: EvalImage
    error: str | None = None
    fatal: str | None = None  # a malformed annotation: stops the run
    encoder_input: torch.Tensor | None = None  # (3, h, w) uint8, longest side = input size
    original_size: tuple[int, int] = (0, 0)
    rgb: np.ndarray | None = None  # (H, W, 3) uint8, only when a detector needs it
    gt_masks: np.ndarray | None = None  # (N, H, W) bool
    gt_boxes: np.ndarray | None = None  # (N, 4) xyxy
    gt_areas: list[float] | None = None
    gt_ids: list[Any] | None = None


class EvalImages(Dataset):
    """Items of ``images[indices]``; ``with_gt``: decode GT masks of annotations with area >= 1."""

    def __init__(
        self,
        *,
        images: list[EvalImage],
        indices: range | list[int],
        annotations: dict[int, list[dict[str, Any]]],
        input_size: int,
        with_gt: bool,
        keep_rgb: bool,
        interpolation: str = "bilinear",
    ) -> None:
        self.images = images
        self.indices = list(indices)
        self.annotations = annotations
        self.input_size = input_size
        self.with_gt = with_gt
        self.keep_rgb = keep_rgb
        self.interpolation = interpolation  # the model's (``Sam.interpolation``)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> EvalItem:
        index = self.indices[i]
        image = self.images[index]
        item = EvalItem(index=index, image=image)
        try:
            rgb = load_image(image.path)
        except DataError as exc:
            item.error = str(exc)
            return item
        h, w = rgb.shape[:2]
        item.original_size = (h, w)
        item.encoder_input = torch.from_numpy(
            np.array(resize_longest(rgb, self.input_size, self.interpolation), dtype=np.uint8, copy=True)
        ).permute(2, 0, 1)
        if self.keep_rgb:
            item.rgb = rgb
        if self.with_gt:
            anns = [a for a in self.annotations.get(image.image_id, []) if float(a["area"]) >= 1]
            try:
                masks = [annotation_to_mask(a, h, w) for a in anns]
            except DataError as exc:
                item.fatal = f"{exc} (image {image.image_id}, {image.path})"
                return item
            item.gt_masks = np.stack(masks) if masks else np.zeros((0, h, w), dtype=bool)
            item.gt_boxes = np.array([bbox_xywh_to_xyxy(a["bbox"]) for a in anns], dtype=np.float64).reshape(
                -1, 4
            )
            item.gt_areas = [float(a["area"]) for a in anns]
            item.gt_ids = [a.get("id") for a in anns]
        return item


def read_batches(items: EvalImages, batch_size: int, threads: int) -> Generator[list[EvalItem], None, None]:
    """``items`` in order, in lists of ``batch_size``. With ``threads`` > 0 that many threads read
    up to two batches per thread ahead of the caller; with 0 the caller reads each batch itself.
    """
    batch_size = max(1, batch_size)
    if threads <= 0:
        for start in range(0, len(items), batch_size):
            yield [items[i] for i in range(start, min(start + batch_size, len(items)))]
        return
    pool = ThreadPoolExecutor(threads, thread_name_prefix="evsam-read")
    following = iter(range(len(items)))
    pending: deque[Future[EvalItem]] = deque()

    def read_ahead() -> None:
        for i in following:
            pending.append(pool.submit(items.__getitem__, i))
            if len(pending) == batch_size * 2 * threads:
                return

    try:
        read_ahead()
        while pending:
            batch = [pending.popleft().result() for _ in range(min(batch_size, len(pending)))]
            read_ahead()
            yield batch
    finally:
        # An error or an early stop (the consumer closing the generator) leaves no reads behind.
        pool.shutdown(wait=True, cancel_futures=True)

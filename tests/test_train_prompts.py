"""Prompt sampling: tight boxes, 1-10 points inside the mask, the finetune transform's prompts."""

from __future__ import annotations

import numpy as np
import pytest

from evsam_cli.data.sa1b import Sa1bRecord, decode_mask
from evsam_cli.train.finetune import FinetuneTransform
from evsam_cli.train.prompts import mask_box, sample_points, to_prompt_frame


def _ring(h=40, w=60):
    yy, xx = np.mgrid[0:h, 0:w]
    d2 = (xx - 35.5) ** 2 + (yy - 17.5) ** 2
    return (d2 <= 12**2) & (d2 >= 6**2)


def test_box_is_tight():
    mask = np.zeros((10, 12), dtype=bool)
    mask[2:5, 3:9] = True
    mask[7, 4] = True
    assert mask_box(mask).tolist() == [3, 2, 9, 8]  # x0, y0, x1 (exclusive), y1 (exclusive)
    with pytest.raises(ValueError):
        mask_box(np.zeros((3, 3), dtype=bool))


def test_points_fall_inside_the_mask_with_1_to_10_clicks():
    mask = _ring()
    rng = np.random.default_rng(0)
    counts = set()
    for _ in range(200):
        coords, labels = sample_points(mask, rng)
        assert coords.shape == (10, 2) and labels.shape == (10,)
        n = int((labels == 1).sum())
        assert (labels[:n] == 1).all() and (labels[n:] == -1).all()
        counts.add(n)
        for x, y in coords[:n]:
            assert mask[int(y), int(x)], (x, y)  # pixel centres of mask pixels (the ring's hole excluded)
    assert counts == set(range(1, 11))


def test_to_prompt_frame_scales_by_the_longest_side():
    assert to_prompt_frame(np.array([10.0, 20.0, 30.0, 40.0]), (200, 512)).tolist() == [20, 40, 60, 80]


def _record(masks):
    from pycocotools import mask as mask_utils

    h, w = masks[0].shape
    anns = []
    for m in masks:
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        anns.append({"segmentation": {"size": [h, w], "counts": rle["counts"].decode()}})
    image = np.zeros((h, w, 3), dtype=np.uint8)
    image[..., 0] = np.arange(w)[None, :]  # a horizontal ramp shows flips
    return Sa1bRecord(image_id=5, name="t", image=image, annotations=anns)


def test_finetune_transform_repeats_masks_and_keeps_prompts_on_them():
    ring = _ring()
    empty = np.zeros_like(ring)
    record = _record([ring, empty])  # the empty mask is never used
    transform = FinetuneTransform(input_size=64, masks_per_image=3)
    flips = set()
    for seed in range(6):
        s = transform(record, np.random.default_rng(seed))
        assert s["masks"].shape == (3, 64, 64) and s["boxes"].shape == (3, 4)
        flipped = bool(s["image"][0, 0, 0] > s["image"][0, 0, 40])
        flips.add(flipped)
        truth = ring[:, ::-1] if flipped else ring
        scale = 1024 / 60
        box = (s["boxes"][0].numpy() / scale).round().tolist()
        assert box == mask_box(truth).tolist()
        n = int((s["point_labels"][0] == 1).sum())
        for x, y in s["points"][0, :n].numpy() / scale:
            assert truth[int(y), int(x)]
        # the resized ground truth agrees with the (flipped) mask
        small = s["masks"][0].numpy()[: round(40 * 64 / 60), :64]
        assert abs(small.mean() - truth.mean()) < 0.05
    assert flips == {True, False}
    assert transform(_record([empty]), np.random.default_rng(0)) is None  # no usable mask: skipped


def test_decode_then_box_roundtrip_on_rle():
    ring = _ring()
    rec = _record([ring])
    assert np.array_equal(decode_mask(rec.annotations[0]["segmentation"], 40, 60), ring)

"""The official click rule on small hand-made masks, and exactness against a brute-force distance."""

from __future__ import annotations

import numpy as np

from evsam_cli.evaluation.clicker import Clicker, squared_distance_to_background


def brute_force(mask: np.ndarray) -> np.ndarray:
    """Squared distance from each True pixel to the nearest False pixel, outside counting as False."""
    h, w = mask.shape
    padded = np.pad(mask, 1)
    bg = np.argwhere(~padded)
    out = np.zeros((h, w), dtype=np.int64)
    for y, x in np.argwhere(mask):
        out[y, x] = int(((bg - [y + 1, x + 1]) ** 2).sum(1).min())
    return out


def test_distance_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((9, 13)) < 0.7
        np.testing.assert_array_equal(squared_distance_to_background(mask), brute_force(mask))


def test_first_click_is_the_object_centre():
    gt = np.zeros((11, 11), dtype=bool)
    gt[2:9, 2:9] = True
    click = Clicker(gt).make_next_click(np.zeros_like(gt))
    assert (click.y, click.x, click.positive) == (5, 5, True)


def test_image_border_counts_as_background():
    # Rows 0-2 of a 9-wide image: with the border as background the deepest row is 1, and the first
    # pixel (row-major) at the maximum distance 2 is (1, 1). Ignoring the border would pick row 0.
    gt = np.zeros((6, 9), dtype=bool)
    gt[:3] = True
    click = Clicker(gt).make_next_click(np.zeros_like(gt))
    assert (click.y, click.x) == (1, 1)


def test_tie_between_miss_and_false_positive_goes_negative():
    gt = np.zeros((3, 9), dtype=bool)
    gt[:, 0:3] = True
    pred = np.zeros_like(gt)
    pred[:, 6:9] = True  # missed region and false positive region both 2 px deep at their centres
    click = Clicker(gt).make_next_click(pred)
    assert (click.y, click.x, click.positive) == (1, 7, False)


def test_larger_error_region_wins_and_clicked_pixels_are_not_reused():
    gt = np.zeros((12, 12), dtype=bool)
    gt[1:11, 1:11] = True
    pred = np.zeros_like(gt)
    pred[1:11, 1:4] = True  # most of the object is still missed -> positive click in the miss
    clicker = Clicker(gt)
    first = clicker.make_next_click(pred)
    assert first.positive and first.x > 3
    second = clicker.make_next_click(pred)  # same prediction again: the same pixel is not clicked twice
    assert second.positive and (second.y, second.x) != (first.y, first.x)
    coords, labels = clicker.points()
    assert coords.tolist() == [[first.x, first.y], [second.x, second.y]] and labels.tolist() == [1, 1]


def test_false_positive_gives_negative_click():
    gt = np.zeros((10, 10), dtype=bool)
    gt[4:6, 4:6] = True
    pred = np.ones_like(gt)  # everything predicted: the background error dominates
    click = Clicker(gt).make_next_click(pred)
    assert not click.positive and not gt[click.y, click.x]

"""Thresholded mask upscaling decides pixels from low-res signs and agrees with the dense resize."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evsam_cli.accel import upscale
from evsam_cli.accel.upscale import upscale_binary, upscale_logits
from evsam_cli.data.frames import bilinear_matrix, preprocess_shape, upscale_matrices
from evsam_cli.models import create_model


def _blobs(n: int, m: int, seed: int = 0) -> torch.Tensor:
    """Low-res logits like a trained decoder's: a smooth blob per mask, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    out = torch.empty(n, m, 256, 256)
    for i in range(n):
        for j in range(m):
            cy, cx = torch.rand(2, generator=g) * 200
            r = 4 + torch.rand(1, generator=g) * 40
            dist = ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt()
            out[i, j] = 8 * (1 - dist / r) + 0.3 * torch.randn(256, 256, generator=g)
    return out


SIZES = [(480, 640), (1000, 750), (333, 500), (37, 29), (1500, 2000), (1024, 1024)]


def _check_against_exact(got: torch.Tensor, masks: torch.Tensor, frame, original) -> None:
    """``got`` is the thresholded upscaling, up to pixels within float rounding of 0: checked
    against SAM's resizes in float64 (SAM's own float32 resizes are off by up to ~1e-4)."""
    exact = upscale_logits(masks.double(), frame, original, 1024)
    assert got.dtype == torch.bool and got.shape == exact.shape
    differ = got != (exact > 0)
    assert not (differ & (exact.abs() > 1e-5)).any()
    assert differ.sum() <= 1e-5 * differ.numel()


@pytest.mark.parametrize("original", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
@pytest.mark.parametrize("kind", ["blobs", "noise"])
def test_binary_upscaling_equals_thresholded_logits(original, kind):
    masks = (
        _blobs(3, 2)
        if kind == "blobs"
        else torch.randn(3, 2, 256, 256, generator=torch.Generator().manual_seed(1))
    )
    frame = preprocess_shape(*original, 1024)
    _check_against_exact(upscale._banded_binary(masks, frame, original, 1024), masks, frame, original)
    sign = upscale._sign_rule(masks, frame, original, 1024)
    if kind == "blobs":  # short outlines: decided by the sign rule
        assert sign is not None
        _check_against_exact(sign, masks, frame, original)
    else:  # outlines everywhere: left to the banded products
        assert sign is None
    got = upscale_binary(masks, frame, original, 1024)  # whichever it picks
    _check_against_exact(got, masks, frame, original)
    # and SAM's own float32 resizes disagree only where they are within their rounding of 0
    ref = upscale_logits(masks, frame, original, 1024)
    assert not ((got != (ref > 0)) & (ref.abs() > 1e-3)).any()


@pytest.mark.parametrize("original", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_read_extent_bounds_what_the_upscaling_reads(original):
    """Low-res logits past ``read_extent`` (the padding of the prompt frame) change nothing: set
    to zeros (as the CPU backend leaves them) or to huge values, every upscaling path gives the
    same result as from the full logits. And the extent is tight: the last row and column it
    keeps do change the result."""
    masks = _blobs(2, 2, seed=3)
    frame = preprocess_shape(*original, 1024)
    rows = upscale.read_extent(256, 1024, frame[0], original[0])
    cols = upscale.read_extent(256, 1024, frame[1], original[1])
    # the image's share of the frame, and a pixel more for the bilinear taps at its edge
    assert rows <= min(256, -(-frame[0] // 4) + 1) and cols <= min(256, -(-frame[1] // 4) + 1)
    for fill in (0.0, 1e6, -1e6):
        cut = torch.full_like(masks, fill)
        cut[..., :rows, :cols] = masks[..., :rows, :cols]
        assert torch.equal(
            upscale_logits(cut, frame, original, 1024), upscale_logits(masks, frame, original, 1024)
        )
        assert torch.equal(
            upscale._banded_binary(cut, frame, original, 1024),
            upscale._banded_binary(masks, frame, original, 1024),
        )
        sign = upscale._sign_rule(cut, frame, original, 1024)
        if sign is not None:
            assert torch.equal(sign, upscale_binary(masks, frame, original, 1024))
    for last in ((rows - 1, slice(None)), (slice(None), cols - 1)):
        moved = masks.clone()
        moved[(..., *last)] += 100.0
        assert not torch.equal(
            upscale_logits(moved, frame, original, 1024), upscale_logits(masks, frame, original, 1024)
        )


@pytest.mark.parametrize("path", ["_sign_rule", "_banded_binary"])
def test_edge_values(path):
    upscale_fn = getattr(upscale, path)
    frame, original = (768, 1024), (480, 640)
    zeros = torch.zeros(1, 1, 256, 256)
    assert not upscale_fn(zeros, frame, original, 1024).any()  # 0 is not above the threshold
    tiny = torch.full((1, 1, 256, 256), 1e-20)
    assert upscale_fn(tiny, frame, original, 1024).all()
    step = torch.full((1, 1, 256, 256), -3.0)
    step[..., 100:, :] = 5.0
    got = upscale_fn(step, frame, original, 1024)
    torch.testing.assert_close(got, upscale_logits(step, frame, original, 1024) > 0, rtol=0, atol=0)


def test_axis_taps_compose_the_two_resizes():
    taps = upscale._axis_taps(256, 1024, 683, 1000)
    assert taps is not None
    matrix = upscale_matrices((683, 683), (1000, 1000), 1024, 256)[0]
    rebuilt = np.zeros_like(matrix)
    for r in range(len(taps.first)):
        for k in range(int(taps.count[r])):
            i = int(taps.first[r]) + k
            assert int(taps.run[i]) == r
            rebuilt[i, r : r + 3] = taps.block_weight[r, k].numpy()[: 256 - r]
    np.testing.assert_allclose(rebuilt, matrix, atol=1e-15)
    np.testing.assert_allclose(bilinear_matrix(7, 7), np.eye(7))


def test_model_threshold_and_predictor_use_the_binary_path(small_model, scene):
    from evsam_cli.predictor.sam_predictor import SamPredictor

    image, _ = scene
    predictor = SamPredictor(small_model)
    predictor.set_image(image)
    box = np.array([80, 45, 160, 135])
    masks, _, _ = predictor.predict(box=box)
    logits, _, _ = predictor.predict(box=box, return_logits=True)
    differ = masks != (logits > 0)
    assert not (differ & (np.abs(logits) > 1e-5)).any()
    # Another threshold: the same as thresholding the logits there (subtracted at low res).
    low = 1.5 + torch.randn(1, 3, 256, 256)
    from evsam_cli.accel.backend import CpuBackend

    model = create_model("efficientvit-sam-l0", input_size=128)
    model.mask_threshold = 1.5
    backend = CpuBackend(model, optimize_encoder=False)
    for original in [(48, 64), (1500, 2000)]:  # banded products, sign rule
        frame = preprocess_shape(*original, 1024)
        _check_against_exact(backend.upscale(low, frame, original, binary=True), low - 1.5, frame, original)

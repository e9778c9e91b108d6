"""SamPredictor: SAM semantics, batched == unbatched, image conversions, frames."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from evsam_cli.data.images import load_image, to_rgb_uint8
from evsam_cli.errors import DataError
from evsam_cli.models.sam import preprocess_shape
from evsam_cli.predictor.sam_predictor import SamPredictor


def test_predict_shapes_and_types(small_model, scene):
    image, _ = scene
    p = SamPredictor(small_model)
    p.set_image(image)
    masks, scores, low = p.predict(box=np.array([80, 45, 160, 135]))
    assert masks.shape == (3, 180, 240) and masks.dtype == bool
    assert scores.shape == (3,) and low.shape == (3, 256, 256)
    masks, scores, low = p.predict(
        point_coords=np.array([[120, 90]]),
        point_labels=np.array([1]),
        multimask_output=False,
        return_logits=True,
    )
    assert masks.shape == (1, 180, 240) and masks.dtype == np.float32
    assert scores.shape == (1,) and low.shape == (1, 256, 256)
    assert (
        (masks > 0)
        == p.predict(point_coords=np.array([[120, 90]]), point_labels=np.array([1]), multimask_output=False)[
            0
        ]
    ).all()


def test_batched_equals_unbatched(small_model, scene):
    image, _ = scene
    p = SamPredictor(small_model, max_prompts_per_pass=2)  # also exercises chunking
    p.set_image(image)
    boxes = np.array([[80, 45, 160, 135], [0, 0, 239, 179], [10, 20, 40, 60]], dtype=np.float64)
    bm, bs, bl = p.predict_batch(boxes=boxes, return_logits=True)
    assert bm.shape == (3, 3, 180, 240) and bs.shape == (3, 3) and bl.shape == (3, 3, 256, 256)
    for i, box in enumerate(boxes):
        m, s, low = p.predict(box=box, return_logits=True)
        np.testing.assert_allclose(m, bm[i], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(s, bs[i], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(low, bl[i], rtol=1e-4, atol=1e-4)

    coords = np.array([[[120, 90], [20, 20]], [[60, 100], [200, 30]]], dtype=np.float64)
    labels = np.array([[1, 0], [1, 1]])
    pm, ps, _ = p.predict_batch(
        point_coords=coords, point_labels=labels, multimask_output=False, return_logits=True
    )
    for i in range(2):
        m, s, _ = p.predict(
            point_coords=coords[i], point_labels=labels[i], multimask_output=False, return_logits=True
        )
        np.testing.assert_allclose(m, pm[i], rtol=1e-4, atol=1e-4)


def test_prompt_frame_is_sams_1024_frame(small_model):
    """Encoder at 256 here, but prompts are scaled into the 1024 frame like the official code."""
    p = SamPredictor(small_model)
    p.set_embedding(small_model.pixel_mean.new_zeros(1, 256, 64, 64), (300, 400))
    assert p.input_size == preprocess_shape(300, 400, 1024) == (768, 1024)
    np.testing.assert_allclose(p.apply_coords(np.array([[400.0, 300.0]])), [[1024.0, 768.0]])
    np.testing.assert_allclose(p.apply_boxes(np.array([[0, 0, 200, 150]])), [[0, 0, 512, 384]])


def test_mask_input_round(small_model, scene):
    image, _ = scene
    p = SamPredictor(small_model)
    p.set_image(image)
    _, scores, low = p.predict(point_coords=np.array([[120, 90]]), point_labels=np.array([1]))
    best = int(np.argmax(scores))
    masks, s2, _ = p.predict(
        point_coords=np.array([[120, 90], [10, 10]]),
        point_labels=np.array([1, 0]),
        mask_input=low[best : best + 1],
        multimask_output=False,
    )
    assert masks.shape == (1, 180, 240)


def test_bgr_equals_flipped_rgb(small_model, scene):
    image, _ = scene
    a, b = SamPredictor(small_model), SamPredictor(small_model)
    a.set_image(image)
    b.set_image(np.ascontiguousarray(image[..., ::-1]), image_format="BGR")
    np.testing.assert_allclose(a.features.numpy(), b.features.numpy(), rtol=0, atol=0)


def test_errors(small_model):
    p = SamPredictor(small_model)
    with pytest.raises(RuntimeError, match="set_image"):
        p.predict(box=np.array([0, 0, 1, 1]))
    p.set_image(np.zeros((32, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="point_labels"):
        p.predict(point_coords=np.array([[1, 1]]))
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        p.predict_batch(boxes=np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="image_format"):
        p.set_image(np.zeros((8, 8, 3), dtype=np.uint8), image_format="HSV")


@pytest.mark.parametrize(
    "array",
    [
        np.full((20, 30), 128, dtype=np.uint8),  # grayscale
        np.full((20, 30, 1), 128, dtype=np.uint8),
        np.dstack([np.full((20, 30, 3), 128, dtype=np.uint8), np.zeros((20, 30), dtype=np.uint8)]),  # RGBA
        np.full((20, 30, 3), 128 * 257, dtype=np.uint16),  # 16-bit
        np.full((20, 30, 3), 128 / 255, dtype=np.float32),  # float in [0, 1]
    ],
)
def test_pixel_layouts_are_converted(array, small_model):
    rgb = to_rgb_uint8(array)
    assert rgb.shape == (20, 30, 3) and rgb.dtype == np.uint8
    assert (rgb == 128).all()
    p = SamPredictor(small_model)
    p.set_image(array)  # accepted directly
    assert p.original_size == (20, 30)


def test_bad_arrays_rejected():
    with pytest.raises(DataError):
        to_rgb_uint8(np.zeros((4, 4, 2), dtype=np.uint8))
    with pytest.raises(DataError):
        to_rgb_uint8(np.zeros((0, 4, 3), dtype=np.uint8))


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "P", "LA", "CMYK"])
def test_load_image_modes(tmp_path, mode):
    base = Image.new("RGB", (16, 12), (10, 200, 30))
    img = Image.fromarray(np.full((12, 16), 40000, dtype=np.uint16)) if mode == "I;16" else base.convert(mode)
    path = tmp_path / ("x.tif" if mode in ("I;16", "CMYK") else "x.png")
    img.save(path)
    out = load_image(path)
    assert out.shape == (12, 16, 3) and out.dtype == np.uint8
    if mode == "I;16":
        assert (out == round(40000 / 257)).all()


def test_load_image_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_image(tmp_path / "missing.jpg")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(DataError, match="cannot decode"):
        load_image(bad)
    good = tmp_path / "good.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, quality=90)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(DataError):
        load_image(truncated)


def test_frames_module_is_the_one_conversion():
    """Predictor, ONNX runtime and evaluation share evsam_cli.data.frames (and it needs no torch)."""
    import subprocess
    import sys

    from evsam_cli.data.frames import boxes_to_frame, coords_to_frame

    np.testing.assert_allclose(
        coords_to_frame(np.array([[400.0, 300.0]]), (300, 400), (768, 1024)), [[1024, 768]]
    )
    np.testing.assert_allclose(
        boxes_to_frame(np.array([[0, 0, 200, 150]]), (300, 400), (768, 1024)), [[0, 0, 512, 384]]
    )
    code = "import sys, evsam_cli.data.frames, evsam_cli.export.runtime; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

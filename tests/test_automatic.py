"""Automatic mask generation: helpers on hand-made cases, the pipeline on hand-made decoder
outputs, the real model against an unreordered pipeline and against the official generator."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from evsam_cli.accel.streaming import stream_transformer
from evsam_cli.data.synthetic import synth_image
from evsam_cli.errors import DataError, EvsamError
from evsam_cli.predictor.amg_utils import (
    build_point_grid,
    generate_crop_boxes,
    mask_to_box,
    mask_to_coco_rle,
    mask_to_rle,
    masks_to_boxes,
    remove_small_regions,
    rle_to_mask,
    stability_score,
)
from evsam_cli.predictor.automatic import AmgConfigError, AutomaticMaskGenerator


def tune(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights whose masks pass SAM's default thresholds (IoU ~0.85, sharp logits)."""
    with torch.no_grad():
        model.mask_decoder.iou_prediction_head.layers[-1].bias += 0.9
        for mlp in model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight *= 100
    return model.eval()


@functools.cache
def tuned_model():
    from evsam_cli.models import create_model

    torch.manual_seed(0)
    return tune(create_model("efficientvit-sam-l0", input_size=256))


_EMBEDDINGS: dict = {}


def generator(model, **settings) -> AutomaticMaskGenerator:
    """A generator whose image embeddings are computed by the real encoder once per (model, crop)
    and then reused: the encoder is not what these tests are about, and it is the slow part."""
    gen = AutomaticMaskGenerator(model, **settings)
    real_set_image = gen.predictor.set_image

    def set_image(image):
        key = (id(model), image.shape, image.tobytes())
        if key not in _EMBEDDINGS:
            real_set_image(image)
            _EMBEDDINGS[key] = gen.predictor.features
        gen.predictor.set_embedding(_EMBEDDINGS[key], image.shape[:2])

    gen.predictor.set_image = set_image  # type: ignore[method-assign]
    return gen


def blank_embedding(gen: AutomaticMaskGenerator) -> None:
    """Skip the encoder entirely (for tests whose decoder outputs are hand-made)."""
    gen.predictor.set_image = (
        lambda image: gen.predictor.set_embedding(  # type: ignore[method-assign]
            torch.zeros(1, 256, 64, 64), image.shape[:2]
        )
    )


@functools.cache
def scene() -> np.ndarray:
    image, _, _ = synth_image(np.random.default_rng(3), 96, 128, 6)
    return image


# ---------------------------------------------------------------------------- helpers, by hand
def test_point_grid_and_crop_boxes_by_hand():
    assert build_point_grid(2).tolist() == [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]
    boxes, layers = generate_crop_boxes((100, 200), 1, 0.5)
    # overlap = 50, crop 125 x 75, origins x in {0, 75}, y in {0, 25}; x-major order
    assert boxes == [
        [0, 0, 200, 100],
        [0, 0, 125, 75],
        [0, 25, 125, 100],
        [75, 0, 200, 75],
        [75, 25, 200, 100],
    ]
    assert layers == [0, 1, 1, 1, 1]


def test_stability_score_by_hand():
    logits = torch.full((2, 10, 10), -3.0)
    logits[0].view(-1)[:4] = 2.0  # > +1 and > -1
    logits[0].view(-1)[4:10] = 0.5  # only > -1
    logits[0].view(-1)[10:20] = -0.5  # only > -1
    score = stability_score(logits, 0.0, 1.0)
    assert score[0].item() == pytest.approx(4 / 20)
    assert torch.isnan(score[1])  # nothing above -1: kept by no threshold
    assert stability_score(logits[:1], 0.0, 0.4).item() == 1.0  # 0.5 now counts in both, -0.5 in neither
    assert stability_score(logits[:1], 0.0, 3.5).item() == 0.0  # nothing above 3.5, everything above -3.5


def test_boxes_and_rle_by_hand():
    masks = torch.zeros(3, 5, 7, dtype=torch.bool)
    masks[0, 1:4, 2] = True
    masks[0, 3, 2:6] = True  # an L: rows 1..3, cols 2..5
    masks[1, 0, 0] = True  # first pixel set
    assert masks_to_boxes(masks).tolist() == [[2, 1, 5, 3], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert mask_to_box(masks[0].numpy()) == [2, 1, 5, 3]
    for m in masks.numpy():
        rle = mask_to_rle(m)
        assert sum(rle["counts"]) == m.size and sum(rle["counts"][1::2]) == m.sum()
        assert np.array_equal(rle_to_mask(rle), m)
        coco = mask_to_coco_rle(m)
        assert np.array_equal(mask_utils.decode({"size": coco["size"], "counts": coco["counts"].encode()}), m)
        assert np.array_equal(rle_to_mask(coco), m)
        assert coco == {**mask_utils.frPyObjects(rle, *rle["size"]), "counts": coco["counts"]}
    assert mask_to_rle(masks[1].numpy())["counts"][:2] == [0, 1]  # starts with zero background pixels


def test_remove_small_regions_by_hand():
    mask = np.zeros((20, 20), dtype=bool)
    mask[2:12, 2:12] = True
    mask[5:7, 5:7] = False  # 4-pixel hole
    mask[15:17, 15] = True  # 2-pixel island
    filled, changed = remove_small_regions(mask, 5, "holes")
    assert changed and filled[5:7, 5:7].all() and filled.sum() == mask.sum() + 4
    cleaned, changed = remove_small_regions(filled, 5, "islands")
    assert changed and not cleaned[15:17, 15].any() and cleaned.sum() == 100
    same, changed = remove_small_regions(cleaned, 5, "islands")
    assert not changed and np.array_equal(same, cleaned)
    # diagonal neighbours are connected (8-connectivity): this 3-pixel island survives area 3
    diag = np.zeros((6, 6), dtype=bool)
    diag[1, 1] = diag[2, 2] = diag[3, 3] = True
    assert not remove_small_regions(diag, 3, "islands")[1]
    # every island small: the largest is kept
    two = np.zeros((6, 6), dtype=bool)
    two[0, 0] = True
    two[4:6, 4] = True
    kept, changed = remove_small_regions(two, 10, "islands")
    assert changed and kept.sum() == 2 and kept[4:6, 4].all()


# ---------------------------------------------------------------------------- pipeline, hand-made decoder
def _square(rows: tuple[int, int], cols: tuple[int, int], inside: float = 20.0, outside: float = -20.0):
    """Low-res (256x256) logits of an image-pixel rectangle for a 64x64 image (low-res = 4x)."""
    low = torch.full((256, 256), outside)
    low[rows[0] * 4 : rows[1] * 4, cols[0] * 4 : cols[1] * 4] = inside
    return low


def _fake_decoder(gen: AutomaticMaskGenerator, iou: torch.Tensor, low: torch.Tensor, calls: list) -> None:
    """Replace the model's decoder by fixed outputs: iou (P, 3), low-res logits (P, 3, 256, 256)."""

    def decode_tokens(coords, labels):
        assert coords.shape[0] == iou.shape[0]
        return iou.clone(), None

    def mask_logits(tokens, prompt_idx, token_idx):
        calls.append(prompt_idx.tolist())
        return low[prompt_idx, token_idx]

    gen.predictor.backend.decode_tokens = decode_tokens  # type: ignore[method-assign]
    gen.predictor.backend.mask_logits = mask_logits  # type: ignore[method-assign]


def test_thresholds_stability_and_nms_on_hand_made_masks(small_model):
    a, a_shift = _square((8, 40), (8, 40)), _square((9, 41), (9, 41))
    b, c = _square((40, 60), (36, 60)), _square((2, 6), (50, 58))
    unstable = _square((20, 30), (20, 30), inside=0.5, outside=-3.0)  # nothing above +1
    low = torch.stack(
        [
            torch.stack([a, a_shift, b]),
            torch.stack([b, unstable, c]),
            torch.stack([a, b, c]),
            torch.stack([b, a, c]),
        ]
    )
    iou = torch.tensor([[0.95, 0.92, 0.50], [0.90, 0.99, 0.89], [0.1, 0.1, 0.1], [0.91, 0.2, 0.3]])
    grid = np.array([[0.1, 0.1], [0.2, 0.2], [0.3, 0.3], [0.4, 0.4]])
    for mode in ("binary_mask", "coco_rle", "uncompressed_rle"):
        gen = AutomaticMaskGenerator(small_model, points_per_side=None, point_grids=[grid], output_mode=mode)
        calls: list = []
        _fake_decoder(gen, iou, low, calls)
        blank_embedding(gen)
        records = gen.generate(np.zeros((64, 64, 3), dtype=np.uint8))
        # the mask head ran only for masks above pred_iou_thresh (prompt 2 had none)
        assert calls == [[0, 0, 1, 1, 1, 3]]
        # A beats its shifted copy, B from prompt 3 (0.91) beats B from prompt 1 (0.90), C stays;
        # the unstable mask is gone; best first.
        assert [r["predicted_iou"] for r in records] == pytest.approx([0.95, 0.91, 0.89])
        assert [r["bbox"] for r in records] == [[8, 8, 31, 31], [36, 40, 23, 19], [50, 2, 7, 3]]
        assert [r["point_coords"] for r in records] == [[[6.4, 6.4]], [[25.6, 25.6]], [[12.8, 12.8]]]
        assert [r["area"] for r in records] == [32 * 32, 20 * 24, 4 * 8]
        for r in records:
            assert 0.95 <= r["stability_score"] <= 1.0
            assert r["crop_box"] == [0, 0, 64, 64]
            seg = r["segmentation"] if mode == "binary_mask" else rle_to_mask(r["segmentation"])
            assert seg.shape == (64, 64) and seg.sum() == r["area"]


def test_crop_layer_edge_filter_and_uncropping(small_model):
    """crop_n_layers=1 on a 200x200 image: each crop decodes a centred square and a strip along
    its right border; strips on inner crop borders are dropped, those on the image border kept."""

    boxes, _ = generate_crop_boxes((200, 200), 1, 512 / 1500)
    gen = AutomaticMaskGenerator(small_model, points_per_side=1, crop_n_layers=1, box_nms_thresh=0.7)
    blank_embedding(gen)
    iou = torch.tensor([[0.95, 0.93, 0.1]])

    def decode_tokens(coords, labels):
        return iou.clone(), None

    def mask_logits(tokens, prompt_idx, token_idx):
        h, w = gen.predictor.original_size
        scale = 1024 / max(h, w) / 4  # low-res pixels per crop pixel
        low = torch.full((3, 256, 256), -20.0)
        cy, cx = h / 2 * scale, w / 2 * scale
        low[0, int(cy - 10 * scale) : int(cy + 10 * scale), int(cx - 10 * scale) : int(cx + 10 * scale)] = (
            20.0
        )
        low[1, int(0.3 * h * scale) : int(0.7 * h * scale), int((w - 3) * scale) :] = (
            20.0  # right-border strip
        )
        return low[token_idx]

    gen.predictor.backend.decode_tokens = decode_tokens  # type: ignore[method-assign]
    gen.predictor.backend.mask_logits = mask_logits  # type: ignore[method-assign]
    records = gen.generate(np.zeros((200, 200, 3), dtype=np.uint8))
    crops = [tuple(r["crop_box"]) for r in records]
    all_crops = [(x0, y0, x1 - x0, y1 - y0) for x0, y0, x1, y1 in boxes]
    squares = [r for r in records if r["predicted_iou"] == pytest.approx(0.95)]
    strips = [r for r in records if r["predicted_iou"] == pytest.approx(0.93)]
    assert sorted(tuple(r["crop_box"]) for r in squares) == sorted(all_crops)  # one per crop
    # strips survive only where the crop's right border is the image's right border
    assert sorted(tuple(r["crop_box"]) for r in strips) == sorted(c for c in all_crops if c[0] + c[2] == 200)
    assert len(records) == len(squares) + len(strips) and set(crops) <= set(all_crops)
    # crop NMS order: smaller crops first
    assert crops[: len(crops) - 2] == [c for c in crops if c != (0, 0, 200, 200)]
    for r in records:
        x, y, w, h = r["crop_box"]
        seg = r["segmentation"]
        assert seg[y : y + h, x : x + w].sum() == seg.sum() == r["area"]  # inside its crop
        bx, by, bw, bh = r["bbox"]
        assert x <= bx and bx + bw < x + w and y <= by and by + bh < y + h
        # the point prompt is the crop's own grid point, in image pixels
        assert r["point_coords"] == [[x + w / 2, y + h / 2]]


# ---------------------------------------------------------------------------- the real model
def _check_record(r: dict, shape: tuple[int, int]) -> np.ndarray:
    assert set(r) == {
        "segmentation",
        "area",
        "bbox",
        "predicted_iou",
        "point_coords",
        "stability_score",
        "crop_box",
    }
    seg = r["segmentation"]
    mask = seg if isinstance(seg, np.ndarray) else rle_to_mask(seg)
    assert mask.dtype == bool and mask.shape == shape
    assert r["area"] == int(mask.sum()) > 0
    ys, xs = np.nonzero(mask)
    assert r["bbox"] == [
        xs.min(),
        ys.min(),
        xs.max() - xs.min(),
        ys.max() - ys.min(),
    ]  # SAM: x + w = last column
    assert all(isinstance(v, int) for v in r["bbox"] + r["crop_box"])
    assert isinstance(r["predicted_iou"], float) and isinstance(r["stability_score"], float)
    assert len(r["point_coords"]) == 1 and len(r["point_coords"][0]) == 2
    return mask


def test_records_format_and_output_modes():
    model, image = tuned_model(), scene()
    settings = dict(points_per_side=3, pred_iou_thresh=0.8, stability_score_thresh=0.8, box_nms_thresh=1.0)
    binary = generator(model, **settings).generate(image)
    assert len(binary) >= 3
    masks = [_check_record(r, image.shape[:2]) for r in binary]
    assert all(r["predicted_iou"] > 0.8 and r["stability_score"] >= 0.8 for r in binary)
    for mode in ("coco_rle",):  # uncompressed RLE: see the hand-made test
        rles = generator(model, output_mode=mode, **settings).generate(image)
        assert len(rles) == len(binary)
        for r, m in zip(rles, masks, strict=True):
            assert np.array_equal(_check_record(r, image.shape[:2]), m)
            if mode == "coco_rle":
                assert isinstance(r["segmentation"]["counts"], str)
                rle = {"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"].encode()}
                assert np.array_equal(mask_utils.decode(rle).astype(bool), m)


def _unreordered(model, image, points_per_side, pred_iou_thresh, stability_thresh, nms_thresh):
    """The official order of work with the model's own decoder: every mask of every prompt is
    upscaled to full size, then filtered by IoU, stability, and NMS."""
    from torchvision.ops import batched_nms

    from evsam_cli.predictor.sam_predictor import SamPredictor

    pred = SamPredictor(model)
    pred.set_image(image)
    h, w = image.shape[:2]
    points = build_point_grid(points_per_side) * np.array([[w, h]])
    with torch.inference_mode():
        coords = torch.as_tensor(pred.apply_coords(points))[:, None]
        low, iou = model.decode(
            pred.features, point_coords=coords, point_labels=torch.ones(len(points), 1, dtype=torch.int64)
        )
        logits = model.postprocess_masks(low, pred.input_size, (h, w)).flatten(0, 1)
    iou, pts = iou.flatten(), np.repeat(points, 3, axis=0)
    keep = (iou > pred_iou_thresh).nonzero().squeeze(1)
    logits, iou, pts = logits[keep], iou[keep], pts[keep.numpy()]
    stab = stability_score(logits, 0.0, 1.0)
    keep = (stab >= stability_thresh).nonzero().squeeze(1)
    masks, iou, stab, pts = logits[keep] > 0, iou[keep], stab[keep], pts[keep.numpy()]
    boxes = masks_to_boxes(masks)
    keep = batched_nms(boxes.float(), iou, torch.zeros(len(boxes)), nms_thresh)
    return masks[keep].numpy(), iou[keep], stab[keep], pts[keep.numpy()]


@pytest.mark.parametrize("nms", [0.7, 1.0])
def test_reordered_work_gives_the_same_masks(nms):
    """Filtering before upscaling, the split decoder and NMS before encoding change nothing."""
    model, image = tuned_model(), scene()
    masks, iou, stab, pts = _unreordered(model, image, 3, 0.8, 0.8, nms)
    records = generator(
        model, points_per_side=3, pred_iou_thresh=0.8, stability_score_thresh=0.8, box_nms_thresh=nms
    ).generate(image)
    assert len(records) == len(masks) >= 1
    for r, m, i, s, p in zip(records, masks, iou.tolist(), stab.tolist(), pts.tolist(), strict=True):
        assert r["point_coords"] == [p]
        assert r["predicted_iou"] == pytest.approx(i, abs=1e-5)
        assert r["stability_score"] == pytest.approx(s, abs=1e-4)
        assert (r["segmentation"] != m).sum() <= 2  # float rounding may flip a pixel at |logit| ~ 1e-6


def test_streamed_transformer_equals_the_module():
    model = tuned_model()
    dec = model.mask_decoder
    torch.manual_seed(1)
    image = torch.randn(1, 256, 64, 64)
    original = image.clone()
    pe = model.prompt_encoder.get_dense_pe()
    with torch.inference_mode():
        for n in (1, 5):
            tokens = torch.randn(n, 7, 256)
            hs, src = dec.transformer(image, pe, tokens)
            hs2, streamed = stream_transformer(
                dec.transformer, image, pe, tokens, list(range(7)), keep_tiles=True
            )
            tiles = streamed.tiles
            assert len(tiles) > 1 and all(t.shape[1] % 64 == 0 for t in tiles)  # whole grid rows
            torch.testing.assert_close(hs2, hs, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(torch.cat(tiles, 1), src, rtol=1e-5, atol=1e-5)
            hs3, _ = stream_transformer(dec.transformer, image, pe, tokens, [0, 2, 3, 4])
            torch.testing.assert_close(hs3, hs[:, [0, 2, 3, 4]], rtol=1e-5, atol=1e-5)
            assert torch.equal(image, original)  # the caller's embedding is never written to


def test_crops_on_generated_image():
    model, image = tuned_model(), scene()
    records = generator(
        model, points_per_side=1, crop_n_layers=1, pred_iou_thresh=0.8, stability_score_thresh=0.8
    ).generate(image)
    assert records
    boxes, _ = generate_crop_boxes(image.shape[:2], 1, 512 / 1500)
    allowed = {(x0, y0, x1 - x0, y1 - y0) for x0, y0, x1, y1 in boxes}
    for r in records:
        mask = _check_record(r, image.shape[:2])
        x, y, w, h = r["crop_box"]
        assert tuple(r["crop_box"]) in allowed
        assert mask[y : y + h, x : x + w].sum() == r["area"]  # the mask lies inside its crop


def test_min_mask_region_area_cleans_masks():
    model, image = tuned_model(), scene()
    records = generator(
        model, points_per_side=4, pred_iou_thresh=0.8, stability_score_thresh=0.8, min_mask_region_area=40
    ).generate(image)
    assert records
    for r in records:
        mask = _check_record(r, image.shape[:2])
        # cleaning again changes nothing (a lone small island is kept as the largest one)
        assert np.array_equal(remove_small_regions(mask, 40, "holes")[0], mask)
        assert np.array_equal(remove_small_regions(mask, 40, "islands")[0], mask)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(points_per_side=None), "exactly one of points_per_side and point_grids"),
        (dict(point_grids=[build_point_grid(2)]), "exactly one of points_per_side and point_grids"),
        (dict(pred_iou_thresh=1.5), "pred_iou_thresh"),
        (dict(stability_score_thresh=-0.1), "stability_score_thresh"),
        (dict(box_nms_thresh=float("nan")), "box_nms_thresh"),
        (dict(crop_overlap_ratio=1.0), "crop_overlap_ratio"),
        (dict(points_per_side=0), "points_per_side"),
        (dict(points_per_batch=0), "points_per_batch"),
        (dict(crop_n_layers=-1), "crop_n_layers"),
        (
            dict(points_per_side=2, crop_n_layers=2, crop_n_points_downscale_factor=2),
            "no points in crop layer 2",
        ),
        (dict(output_mode="png"), "output_mode"),
        (dict(points_per_side=None, point_grids=[np.zeros((3, 3))]), "point_grids[0]"),
        (dict(points_per_side=None, point_grids=[np.full((3, 2), 2.0)]), "normalised"),
        (dict(points_per_side=None, point_grids=[build_point_grid(2)], crop_n_layers=1), "needs 2"),
    ],
)
def test_bad_settings(small_model, kwargs, words):
    with pytest.raises(AmgConfigError, match=None) as info:
        AutomaticMaskGenerator(small_model, **kwargs)
    assert words in str(info.value)
    assert isinstance(info.value, EvsamError) and isinstance(info.value, ValueError)


def test_bad_image(small_model):
    gen = AutomaticMaskGenerator(small_model, points_per_side=1)
    with pytest.raises(DataError):
        gen.generate(np.zeros((4, 4, 5), dtype=np.uint8))


def test_exported_from_the_predictor_package():
    from evsam_cli.predictor import AutomaticMaskGenerator as exported

    assert exported is AutomaticMaskGenerator


# ---------------------------------------------------------------------------- official generator
@pytest.mark.reference
def test_same_masks_as_the_official_generator(tmp_path):
    pytest.importorskip("efficientsam")
    from efficientsam.models.efficientvit.sam import EfficientViTSamAutomaticMaskGenerator
    from efficientsam.sam_model_zoo import create_efficientvit_sam_model

    from evsam_cli.models import create_model

    torch.manual_seed(0)
    ref = tune(create_efficientvit_sam_model("efficientvit-sam-l0", pretrained=False, image_size=256))
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    ours = create_model("efficientvit-sam-l0", checkpoint=str(tmp_path / "w.pt"), input_size=256).eval()
    image = scene()
    for settings in (
        dict(points_per_side=2, pred_iou_thresh=0.8, stability_score_thresh=0.8, box_nms_thresh=1.0),
        dict(points_per_side=1, crop_n_layers=1, pred_iou_thresh=0.8, stability_score_thresh=0.8),
    ):
        theirs = EfficientViTSamAutomaticMaskGenerator(ref, output_mode="coco_rle", **settings).generate(
            image
        )
        mine = AutomaticMaskGenerator(ours, output_mode="coco_rle", **settings).generate(image)
        assert len(mine) == len(theirs) >= 1
        for a, b in zip(mine, theirs, strict=True):
            for key in ("bbox", "point_coords", "crop_box"):
                assert a[key] == b[key], key
            assert a["predicted_iou"] == pytest.approx(b["predicted_iou"], abs=1e-5)
            assert a["stability_score"] == pytest.approx(b["stability_score"], abs=1e-3)
            assert a["area"] == pytest.approx(b["area"], abs=2)
            if a["area"] == b["area"]:
                assert a["segmentation"] == b["segmentation"]

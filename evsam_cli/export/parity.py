"""Parity of exported graphs with PyTorch: max absolute differences, checked against a tolerance.

Two kinds of input are compared. *random*: a normal-noise image batch through the encoder and
random labelled points (every label, a mask input) through the decoder, at prompt counts and
point counts other than the ones used for tracing, so a graph whose dynamic axes were frozen
fails here. *image*: a synthetic photograph-like image through ``SamPredictor`` and
``OnnxSamPredictor`` with box and point prompts, comparing embeddings and low-res logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..models.sam import Sam
from .errors import ExportError
from .onnx import OnnxExport
from .runtime import OnnxSamPredictor, open_session

# float32 graphs: differences come from operator order only (~1e-5 on unit-scale tensors).
DEFAULT_ATOL = 1e-3
DEFAULT_RTOL = 1e-3


@dataclass(frozen=True)
class Tolerance:
    atol: float = DEFAULT_ATOL
    rtol: float = DEFAULT_RTOL

    def limit(self, reference: np.ndarray) -> float:
        """Allowed max abs difference for a reference tensor (scaled by its largest value)."""
        return self.atol + self.rtol * float(np.abs(reference).max(initial=0.0))


def synthetic_image(height: int = 480, width: int = 640, seed: int = 0) -> np.ndarray:
    """A photograph-like HxWx3 uint8 image: smooth background, a few shapes, sensor noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack(
        [xx / width * 180 + 40, yy / height * 150 + 60, (xx + yy) / (width + height) * 120 + 80], -1
    )
    for _ in range(6):
        cy, cx = rng.uniform(0.15, 0.85) * height, rng.uniform(0.15, 0.85) * width
        ry, rx = rng.uniform(0.05, 0.2) * height, rng.uniform(0.05, 0.2) * width
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        image[inside] = rng.uniform(0, 255, size=3)
    image += rng.normal(0, 4, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max(initial=0.0))


class ParityRecorder:
    """Collects max abs differences per group and quantity, and the ones beyond tolerance."""

    def __init__(self, tolerance: Tolerance) -> None:
        self.tolerance = tolerance
        self.groups: dict[str, dict[str, float]] = {}
        self.failures: list[str] = []

    def check(self, group: str, name: str, ours: np.ndarray, ref: np.ndarray) -> float:
        ours, ref = np.asarray(ours), np.asarray(ref)
        if ours.shape != ref.shape:
            self.failures.append(f"{group} {name}: shape {ours.shape} != {ref.shape}")
            return float("nan")
        diff = _max_diff(ours, ref)
        store = self.groups.setdefault(group, {})
        store[name] = max(store.get(name, 0.0), diff)
        limit = self.tolerance.limit(ref)
        if not diff <= limit:  # also catches NaN
            self.failures.append(f"{group} {name}: max abs diff {diff:.3g} > {limit:.3g}")
        return diff

    def raise_on_failure(self, what: str) -> None:
        """``ExportError`` listing every failure; the measured values travel as ``.parity``."""
        if self.failures:
            tol = self.tolerance
            error = ExportError(
                f"{what} does not match PyTorch within tolerance (atol={tol.atol:g}, rtol={tol.rtol:g}): "
                + "; ".join(self.failures)
            )
            error.parity = self.groups  # type: ignore[attr-defined]
            raise error


@torch.inference_mode()
def measure_parity(
    model: Sam, export: OnnxExport, *, tolerance: Tolerance | None = None, seed: int = 0
) -> dict[str, Any]:
    """Run PyTorch and onnxruntime side by side; raise ``ExportError`` beyond ``tolerance``.

    Returns ``{"random": {...}, "image": {...}, "tolerance": {...}, "checked_shapes": {...}}``
    where each group holds the max abs differences of embeddings, logits and IoU predictions.
    """
    from ..predictor.sam_predictor import SamPredictor

    tol = tolerance or Tolerance()
    model = model.float().eval()
    device = model.device
    gen = torch.Generator().manual_seed(seed)
    size = model.input_size
    rec = ParityRecorder(tol)

    # ------------------------------------------------------------------ random inputs
    encoder = open_session(export.encoder_path)
    decoder = open_session(export.decoder_path)
    encoder_batches = [1, 3]  # traced at 2: other batches prove the axis is dynamic
    for batch in encoder_batches:
        x = torch.randn(batch, 3, size, size, generator=gen)
        ref = model.image_encoder(x.to(device)).cpu().numpy()
        ours = encoder.run(None, {"images": x.numpy()})[0]
        rec.check("random", "embeddings", ours, ref)

    from .onnx import DecoderOnnxWrapper

    wrapper = DecoderOnnxWrapper(model).eval()
    prompt_shapes = [(5, 3), (1, 1), (2, 6)]
    embedding = torch.randn(1, 256, 64, 64, generator=gen)
    for i, (n, k) in enumerate(prompt_shapes):
        coords = torch.rand(n, k, 2, generator=gen) * 1024
        labels = torch.randint(-1, 4, (n, k), generator=gen).float()
        with_mask = i == 0
        rows = n if (with_mask or export.mask_batch == "prompts") else 1
        mask = (
            torch.randn(rows, 1, 256, 256, generator=gen) * 4 if with_mask else torch.zeros(rows, 1, 256, 256)
        )
        has = torch.full((rows,), 1.0 if with_mask else 0.0)
        inputs = (embedding, coords, labels, mask, has)
        ref_masks, ref_iou = (t.cpu().numpy() for t in wrapper(*(t.to(device) for t in inputs)))
        names = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input")
        masks, iou = decoder.run(
            ["low_res_masks", "iou_predictions"], {nm: t.numpy() for nm, t in zip(names, inputs, strict=True)}
        )
        rec.check("random", "logits", masks, ref_masks)
        rec.check("random", "iou", iou, ref_iou)

    # ------------------------------------------------------------------ a real-looking image
    image = synthetic_image(seed=seed)
    torch_pred = SamPredictor(model)
    onnx_pred = OnnxSamPredictor(export.encoder_path, export.decoder_path)
    torch_pred.set_image(image)
    onnx_pred.set_image(image)
    ref_embedding = torch_pred.get_image_embedding().cpu().numpy()
    rec.check("image", "embeddings", onnx_pred.get_image_embedding(), ref_embedding)
    h, w = image.shape[:2]
    boxes = np.array([[0.1 * w, 0.1 * h, 0.5 * w, 0.6 * h], [0.4 * w, 0.3 * h, 0.95 * w, 0.9 * h]])
    points = np.array([[[0.3 * w, 0.4 * h], [0.7 * w, 0.2 * h]]])
    prompt_sets: tuple[tuple[dict[str, Any], tuple[bool, ...]], ...] = (
        ({"boxes": boxes}, (True, False)),
        ({"point_coords": points, "point_labels": np.array([[1, 0]])}, (True,)),
        ({"boxes": boxes[:1], "point_coords": points, "point_labels": np.array([[1, 1]])}, (False,)),
    )
    for kwargs, modes in prompt_sets:
        for multimask in modes:
            _, ref_scores, ref_low = torch_pred.predict_batch(**kwargs, multimask_output=multimask)
            _, scores, low = onnx_pred.predict_batch(**kwargs, multimask_output=multimask)
            rec.check("image", "logits", low, ref_low)
            rec.check("image", "iou", scores, ref_scores)

    rec.raise_on_failure("exported ONNX")
    return {
        **rec.groups,
        "tolerance": {"atol": tol.atol, "rtol": tol.rtol},
        "checked_shapes": {
            "encoder_batch": encoder_batches,
            "decoder_prompts_points": [list(s) for s in prompt_shapes],
            "image_hw": [h, w],
        },
    }

"""Running exported models without PyTorch model code: ``OnnxSamPredictor``.

Pre- and post-processing are numpy re-statements of ``Sam.preprocess`` and
``Sam.postprocess_masks``: PIL bilinear resize of the longest side to the encoder input size,
normalise, zero-pad; prompts mapped to the 1024 prompt frame; low-res logits upsampled with the
exact weights of ``F.interpolate(mode="bilinear", align_corners=False)``, both resizes composed
and applied in bands (``upscale_masks``). ``ExportedSamPredictor``
holds all of that; subclasses only run the two graphs (onnxruntime here, TensorRT in
``tensorrt.py``). Nothing in this module imports torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..data.frames import (
    LOW_RES_SIZE,
    PIXEL_MEAN,
    PIXEL_STD,
    PROMPT_SIZE,
    preprocess_image,
    preprocess_shape,
    upscale_bands,
    upscale_matrices,
)
from ..data.prompts import PromptablePredictor, Prompts
from ..errors import DataError, MissingDependencyError
from .errors import ExportError

__all__ = [
    "LOW_RES_SIZE",
    "PIXEL_MEAN",
    "PIXEL_STD",
    "PROMPT_SIZE",
    "ExportedSamPredictor",
    "OnnxSamPredictor",
]

NUM_MASK_TOKENS = 4  # token 0: single-mask output; tokens 1-3: multimask outputs


def postprocess_matrices(
    input_size: tuple[int, int], original_size: tuple[int, int], prompt_size: int = PROMPT_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """(Ay (H, 256), Ax (W, 256)) float32 with ``Ay @ low_res @ Ax.T`` = ``Sam.postprocess_masks``
    (``frames.upscale_matrices``)."""
    ay, ax = upscale_matrices(input_size, original_size, prompt_size, LOW_RES_SIZE)
    return ay.astype(np.float32), ax.astype(np.float32)


Bands = list[tuple[int, int, int, int, np.ndarray]]


def postprocess_bands(
    input_size: tuple[int, int], original_size: tuple[int, int], prompt_size: int = PROMPT_SIZE
) -> tuple[Bands, Bands]:
    """The rows and columns of ``postprocess_matrices`` in blocks (``frames.upscale_bands``),
    weights float32."""
    rows, cols = (
        [
            (start, stop, lo, hi, weight.astype(np.float32))
            for start, stop, lo, hi, weight in upscale_bands(
                input_size[a], original_size[a], prompt_size, LOW_RES_SIZE
            )
        ]
        for a in (0, 1)
    )
    return rows, cols


def upscale_masks(
    low_res: np.ndarray, bands: tuple[Bands, Bands], threshold: float | None = None
) -> np.ndarray:
    """(N, C, 256, 256) logits -> (N, C, H, W) logits, or masks ``> threshold`` (bool), with the
    bands of ``postprocess_bands``: ``Ay @ low_res @ Ax.T`` block by block, skipping the zeros
    of both matrices."""
    rows, cols = bands
    n, c, h, w = low_res.shape
    height, width = rows[-1][1], cols[-1][1]
    first, last = cols[0][2], cols[-1][3]  # the low-res columns any output reads
    low = low_res.astype(np.float32, copy=False).reshape(n * c, h, w)[:, :, first:last]
    tall = np.concatenate([weight @ low[:, lo:hi] for _, _, lo, hi, weight in rows], axis=1)
    tall = tall.reshape(n * c * height, last - first)
    out = np.empty((n * c * height, width), dtype=np.float32)
    for start, stop, lo, hi, weight in cols:
        np.matmul(tall[:, lo - first : hi - first], weight.T, out=out[:, start:stop])
    out = out.reshape(n, c, height, width)
    return out if threshold is None else out > threshold


class ExportedSamPredictor(PromptablePredictor):
    """SamPredictor's API over exported graphs; subclasses implement ``_encode``/``_decode``."""

    mask_threshold: float = 0.0

    def __init__(
        self,
        *,
        input_size: int,
        prompt_size: int = PROMPT_SIZE,
        pixel_mean: tuple[float, ...] = PIXEL_MEAN,
        pixel_std: tuple[float, ...] = PIXEL_STD,
        mask_batch: str = "broadcast",
        max_prompts_per_pass: int = 256,
        preprocessing: str = "sam",
    ) -> None:
        """
        Args:
          input_size: side of the square encoder input (the graph's static H = W).
          prompt_size: side of the prompt frame (1024).
          pixel_mean / pixel_std: per-channel normalisation in [0, 255] pixel units.
          mask_batch: "broadcast" (the decoder takes one shared mask input for all prompts) or
            "prompts" (the decoder's mask-input batch must equal the prompt count).
          max_prompts_per_pass: prompts per decoder call in ``predict_batch``.
          preprocessing: the model's ("sam" or "minmax-area"; ``data.frames.PREPROCESSING``).
        """
        self.preprocessing = preprocessing
        self.image_size = int(input_size)
        self.prompt_size = int(prompt_size)
        self.pixel_mean = np.asarray(pixel_mean, dtype=np.float32).reshape(1, 1, 3)
        self.pixel_std = np.asarray(pixel_std, dtype=np.float32).reshape(1, 1, 3)
        if mask_batch not in ("broadcast", "prompts"):
            raise ValueError(f"mask_batch must be 'broadcast' or 'prompts', got {mask_batch!r}")
        self.mask_batch = mask_batch
        self.max_prompts_per_pass = max(1, int(max_prompts_per_pass))
        self.reset_image()

    # ------------------------------------------------------------------ graphs (subclasses)
    def _encode(self, images: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) float32 -> (B, 256, 64, 64) float32."""
        raise NotImplementedError

    def _decode(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Decoder inputs by name -> (N, 4, 256, 256) logits and (N, 4) IoU predictions."""
        raise NotImplementedError

    # ------------------------------------------------------------------ image
    def frame_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        return preprocess_shape(*original_size, self.prompt_size)

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 RGB -> (1, 3, S, S) float32: resize longest side, normalise, zero-pad, as
        the model's ``preprocessing`` does (``Sam.preprocess``)."""
        padded = preprocess_image(
            image,
            self.image_size,
            mode=self.preprocessing,
            pixel_mean=self.pixel_mean,
            pixel_std=self.pixel_std,
        )
        return np.ascontiguousarray(padded.transpose(2, 0, 1)[None])

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Embed an image. ``image``: HxWx3 uint8 (grayscale, RGBA and 16-bit are converted)."""
        image = self._rgb(image, image_format)
        embedding = self._encode(self.preprocess(image))
        self.set_embedding(embedding, image.shape[:2])

    def set_embedding(self, embedding: np.ndarray, original_size: tuple[int, int]) -> None:
        """Use a precomputed (1, 256, 64, 64) embedding of an image of ``original_size`` (h, w)."""
        embedding = np.asarray(embedding, dtype=np.float32)
        if embedding.ndim == 3:
            embedding = embedding[None]
        self.features = np.ascontiguousarray(embedding)
        self._set_frame(original_size)

    def prompt_points(
        self,
        point_coords: np.ndarray | None,
        point_labels: np.ndarray | None,
        boxes: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Points and boxes in original pixels -> the decoder's (N, K, 2) coords and (N, K) labels
        (``Prompts.decoder_points``)."""
        return self._prompts(point_coords, point_labels, boxes, None).decoder_points()

    # ------------------------------------------------------------------ prediction
    def _predict_prompts(
        self, prompts: Prompts, *, multimask_output: bool, return_logits: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Passes of ``max_prompts_per_pass`` prompts through the exported decoder, masks
        upscaled in bands (``upscale_masks``)."""
        assert self.features is not None and self.input_size is not None and self.original_size is not None
        coords, labels = prompts.decoder_points()
        n, masks_in = prompts.count, prompts.mask_input
        if masks_in is not None and masks_in.shape[2:] != (LOW_RES_SIZE, LOW_RES_SIZE):
            raise ValueError(f"mask_input must be ({n}, 1, 256, 256), got {masks_in.shape}")
        select = slice(1, None) if multimask_output else slice(0, 1)
        bands = postprocess_bands(self.input_size, self.original_size, self.prompt_size)
        out_masks, out_scores, out_low = [], [], []
        for start in range(0, n, self.max_prompts_per_pass):
            sl = slice(start, start + self.max_prompts_per_pass)
            count = coords[sl].shape[0]
            if masks_in is not None:
                mask, has = masks_in[sl], np.ones(count, dtype=np.float32)
            else:
                rows = 1 if self.mask_batch == "broadcast" else count
                mask = np.zeros((rows, 1, LOW_RES_SIZE, LOW_RES_SIZE), dtype=np.float32)
                has = np.zeros(rows, dtype=np.float32)
            low, iou = self._decode(
                {
                    "image_embeddings": self.features,
                    "point_coords": np.ascontiguousarray(coords[sl]),
                    "point_labels": np.ascontiguousarray(labels[sl]),
                    "mask_input": mask,
                    "has_mask_input": has,
                }
            )
            low, iou = low[:, select], iou[:, select]
            out_masks.append(upscale_masks(low, bands, None if return_logits else self.mask_threshold))
            out_scores.append(iou.astype(np.float32))
            out_low.append(low.astype(np.float32))
        return np.concatenate(out_masks), np.concatenate(out_scores), np.concatenate(out_low)


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError("onnxruntime", "all", "running exported ONNX models") from None
    return onnxruntime


def onnx_providers(device: str = "cpu") -> list[str]:
    """Execution providers for ``device`` ("cpu" or "cuda"); CUDA needs onnxruntime-gpu."""
    ort = _import_onnxruntime()
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            from ..errors import DeviceError

            raise DeviceError(
                "onnxruntime on cuda needs the CUDAExecutionProvider (pip install onnxruntime-gpu); "
                f"available: {', '.join(ort.get_available_providers())}"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def open_session(path: str | os.PathLike[str], *, device: str = "cpu", threads: int | None = None) -> Any:
    """An onnxruntime session for ``path`` with a clear error for a missing or broken file."""
    ort = _import_onnxruntime()
    path = Path(path)
    if not path.is_file():
        raise DataError(f"ONNX file not found: {path}")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=onnx_providers(device))
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ExportError(f"onnxruntime cannot load {path}: {exc}") from None


def graph_metadata(session: Any) -> dict[str, Any]:
    """The ``evsam.*`` metadata written by ``export_onnx`` (JSON-decoded), or {}."""
    meta = session.get_modelmeta().custom_metadata_map
    out = {}
    for key, value in meta.items():
        if key.startswith("evsam."):
            try:
                out[key[len("evsam.") :]] = json.loads(value)
            except json.JSONDecodeError:
                out[key[len("evsam.") :]] = value
    return out


class OnnxSamPredictor(ExportedSamPredictor):
    """``SamPredictor``'s API over ``encoder.onnx`` and ``decoder.onnx`` run by onnxruntime.

    Example::

        p = OnnxSamPredictor("export/encoder.onnx", "export/decoder.onnx")
        p.set_image(rgb)
        masks, scores, low_res = p.predict(box=np.array([10, 20, 200, 240]))
    """

    def __init__(
        self,
        encoder_path: str | os.PathLike[str],
        decoder_path: str | os.PathLike[str],
        *,
        device: str = "cpu",
        threads: int | None = None,
        max_prompts_per_pass: int = 256,
    ) -> None:
        """
        Args:
          encoder_path / decoder_path: files written by ``evsam export``.
          device: "cpu" or "cuda" (onnxruntime-gpu).
          threads: intra-op threads (onnxruntime's default: all cores).
          max_prompts_per_pass: prompts per decoder call in ``predict_batch``.
        """
        self.encoder = open_session(encoder_path, device=device, threads=threads)
        self.decoder = open_session(decoder_path, device=device, threads=threads)
        enc_in = self.encoder.get_inputs()[0]
        dec_names = {i.name for i in self.decoder.get_inputs()}
        missing = [n for n in ("image_embeddings", "point_coords", "point_labels") if n not in dec_names]
        if missing:
            raise ExportError(f"{decoder_path} is not an evsam decoder graph: inputs {sorted(dec_names)}")
        size = enc_in.shape[-1]
        if not isinstance(size, int):
            raise ExportError(
                f"{encoder_path}: the encoder input {enc_in.name} has no static size ({enc_in.shape})"
            )
        enc_meta, dec_meta = graph_metadata(self.encoder), graph_metadata(self.decoder)
        self.encoder_input = enc_in.name
        self.decoder_inputs = sorted(dec_names)
        super().__init__(
            input_size=size,
            prompt_size=int(enc_meta.get("prompt_size", PROMPT_SIZE)),
            pixel_mean=tuple(enc_meta.get("pixel_mean", PIXEL_MEAN)),
            pixel_std=tuple(enc_meta.get("pixel_std", PIXEL_STD)),
            mask_batch=str(dec_meta.get("mask_batch", "broadcast")),
            max_prompts_per_pass=max_prompts_per_pass,
            preprocessing=str(enc_meta.get("preprocessing", "sam")),
        )

    def _encode(self, images: np.ndarray) -> np.ndarray:
        return self.encoder.run(None, {self.encoder_input: images.astype(np.float32, copy=False)})[0]

    def _decode(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        feeds = {k: v for k, v in inputs.items() if k in self.decoder_inputs}
        low, iou = self.decoder.run(["low_res_masks", "iou_predictions"], feeds)
        return low, iou

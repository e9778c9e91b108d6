"""Box sources for detector-prompt evaluation: a COCO-results file, YOLOv8 or GroundingDINO.

Detectors are a registry: a new one is a class with ``from_options`` (and a ``__call__`` from
an RGB image to detections) plus ``@register_detector("name")``; ``evsam eval --detector`` offers
what is registered. This module imports torch only inside the detectors, so that the command
line can list them instantly.

* ``vitdet``: a COCO-results JSON the user supplies (the ViTDet box files the EfficientViT-SAM
  authors publish have this shape: ``image_id``, ``category_id``, ``bbox`` xywh, ``score``).
* ``yolov8``: ultralytics (AGPL-3.0, the optional ``yolo`` extra, imported only here, lazily)
  with user-given weights; YOLO's 80 COCO classes are mapped to the dataset's category ids by
  name (COCO ids for COCO; names and synonyms for LVIS).
* ``groundingdino``: groundingdino-py (the ``gdino`` extra, imported lazily) with a user-given
  config, weights and a local BERT folder (offline). The category names form the text prompt
  (``"person . car . dog ."``), split into several prompts when they do not fit the model's
  text length; each query box is scored per category by the mean probability over the
  category's tokens, and the best (query, category) pairs are kept.

Detected boxes are cached as COCO-results JSON (written atomically) and reused on the next run.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

import numpy as np

from ..errors import CheckpointError, DataError, MissingDependencyError, SettingError
from ..utils.io import write_json_atomic
from .datasets import read_json

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# The 80 classes of YOLO models trained on COCO, in class-index order.
COCO80_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip


class Detector(Protocol):
    def __call__(self, image: np.ndarray) -> list[dict[str, Any]]:
        """HxWx3 uint8 RGB -> detections ``{"category_id", "bbox" (xywh pixels), "score"}``."""
        ...


@dataclass(frozen=True)
class DetectorOptions:
    """Where detector-prompt boxes come from.

    name: a registered detector (``detector_names()``).
    detections: a COCO-results JSON: the boxes of a file-only detector (``vitdet``); the cache
      of a live one (read when it exists, written after detecting otherwise; default
      ``OUTPUT/detections_<detector>.json``).
    weights: the live detector's weights (default: its ``default_weights``); config: its config
      file (GroundingDINO); text_encoder: a local BERT folder (GroundingDINO).
    image_size: the detector's input size (YOLO's imgsz, default 640; GroundingDINO's shorter
      side, default 800, longer side at most 1333/800 of it).
    max_det: boxes kept per image by a live detector (default 100 for COCO, 300 for LVIS).
    """

    name: str = "vitdet"
    detections: Path | None = None
    weights: Path | None = None
    config: Path | None = None
    text_encoder: Path | None = None
    image_size: int | None = None
    max_det: int | None = None


class RegisteredDetector:
    """What ``register_detector`` records. A live detector overrides ``from_options``; a file-only
    one (boxes computed elsewhere, read from ``DetectorOptions.detections``) sets ``live = False``.
    Messages name the evaluation's parameters (``detector``, ``detections``, ``weights`` ...)."""

    name: ClassVar[str] = ""
    live: ClassVar[bool] = True
    default_weights: ClassVar[str | None] = None  # used when ``DetectorOptions.weights`` is None

    @classmethod
    def from_options(
        cls, options: DetectorOptions, *, categories: Sequence[dict[str, Any]], device: Any, lvis: bool
    ) -> Detector:
        raise NotImplementedError(f"detector {cls.name!r} reads its boxes from a file")


D = TypeVar("D", bound=type[RegisteredDetector])
_REGISTRY: dict[str, type[RegisteredDetector]] = {}


def register_detector(name: str) -> Callable[[D], D]:
    """Class decorator: make ``cls`` the detector ``name`` (``evsam eval --detector name``)."""

    def add(cls: D) -> D:
        if name in _REGISTRY:
            raise ValueError(f"detector {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def detector_names() -> tuple[str, ...]:
    """The registered detectors, in registration order."""
    return tuple(_REGISTRY)


def get_detector(name: str) -> type[RegisteredDetector]:
    if name not in _REGISTRY:
        raise SettingError(f"unknown detector {name!r}; choose one of {', '.join(_REGISTRY)}", "detector")
    return _REGISTRY[name]


def _max_det(options: DetectorOptions, lvis: bool) -> int:
    return options.max_det or (300 if lvis else 100)


@register_detector("vitdet")
class ResultsFile(RegisteredDetector):
    """Boxes from a COCO-results JSON the user supplies (the ViTDet box files the EfficientViT-SAM
    authors publish have this shape)."""

    live = False


# ---------------------------------------------------------------------------- COCO-results files
def _check_detection(det: Any, path: Path, index: int) -> None:
    ok = (
        isinstance(det, dict)
        and all(k in det for k in ("image_id", "category_id", "bbox", "score"))
        and isinstance(det["bbox"], (list, tuple))
        and len(det["bbox"]) == 4
        and all(isinstance(v, (int, float)) for v in det["bbox"])
        and isinstance(det["score"], (int, float))
    )
    if not ok:
        raise DataError(
            f"{path}: entry {index} is not a COCO detection result "
            "(needs 'image_id', 'category_id', 'bbox' [x, y, w, h] and 'score')"
        )


def read_detections(
    path: str | Path, *, image_ids: Sequence[int], known_ids: Sequence[int] | None = None
) -> tuple[dict[int, list[dict[str, Any]]], dict[Any, int]]:
    """A COCO-results JSON -> (detections of ``image_ids`` by image id, unknown image id -> count).

    Detections of images missing from the annotation file (``known_ids``) are returned as
    unknown for the caller to warn about and drop; those of known images that are not being
    evaluated (``--limit``) are ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"detections file not found: {path}")
    data = read_json(path, "detections file")
    if not isinstance(data, list):
        raise DataError(f"{path} is not a COCO results file (expected a JSON list of detections)")
    wanted: dict[int, list[dict[str, Any]]] = {int(i): [] for i in image_ids}
    known = set(wanted) if known_ids is None else {int(i) for i in known_ids}
    unknown: dict[Any, int] = {}
    for i, det in enumerate(data):
        _check_detection(det, path, i)
        image_id = det["image_id"]
        if not isinstance(image_id, int) or image_id not in known:
            unknown[image_id] = unknown.get(image_id, 0) + 1
            continue
        bucket = wanted.get(image_id)
        if bucket is not None:
            bucket.append(
                {
                    "category_id": int(det["category_id"]),
                    "bbox": [float(v) for v in det["bbox"]],
                    "score": float(det["score"]),
                }
            )
    return wanted, unknown


def write_detections(
    path: str | Path, detections: dict[int, list[dict[str, Any]]], order: Sequence[int]
) -> Path:
    """Cache detections as a COCO-results JSON, images in ``order`` (atomic write)."""
    flat = [{"image_id": int(i), **d} for i in order for d in detections.get(int(i), [])]
    return write_json_atomic(path, flat, indent=None)


# ---------------------------------------------------------------------------- category names
def _norm(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").split())


def category_lookup(categories: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Normalised name (and LVIS synonym) -> category id."""
    lookup: dict[str, int] = {}
    for cat in categories:
        for name in [cat.get("name", ""), *cat.get("synonyms", [])]:
            lookup.setdefault(_norm(str(name)), int(cat["id"]))
    return lookup


def _undo_ultralytics_pil_patch() -> None:
    """Give ``PIL.Image.open`` back its own behaviour after importing ultralytics.

    Importing ultralytics replaces ``PIL.Image.open`` process-wide with a wrapper that, on a file
    PIL cannot identify, tries to pip-install a HEIF plugin and raises ``ModuleNotFoundError``
    offline. evsam decodes every image itself (a corrupt one is skipped and reported), so the
    original function is put back.
    """
    from PIL import Image

    try:
        from ultralytics.utils import patches
    except ImportError:
        return
    original = getattr(patches, "_image_open", None)
    if original is not None and Image.open is not original:
        Image.open = original


def class_to_category(class_names: dict[int, str], categories: Sequence[dict[str, Any]]) -> dict[int, int]:
    """Detector class index -> dataset category id, matched by name.

    An 80-class model whose names are plain indices (a model built from a yaml) is taken to
    be a COCO model and gets COCO's names.
    """
    lookup = category_lookup(categories)
    numeric = all(str(v).isdigit() for v in class_names.values())
    mapping: dict[int, int] = {}
    missing = []
    for idx, name in class_names.items():
        if numeric and len(class_names) == len(COCO80_NAMES):
            name = COCO80_NAMES[int(idx)]
        cat = lookup.get(_norm(str(name)))
        if cat is None:
            missing.append(str(name))
        else:
            mapping[int(idx)] = cat
    if not mapping:
        raise DataError("none of the detector's class names match a category of the dataset")
    if missing:
        log.info("%d detector classes have no category in the dataset and are ignored", len(missing))
    return mapping


# ---------------------------------------------------------------------------- YOLOv8
@register_detector("yolov8")
class YoloDetector(RegisteredDetector):
    default_weights = "yolov8x.pt"  # ultralytics resolves (and, online, downloads) release names

    @classmethod
    def from_options(
        cls, options: DetectorOptions, *, categories: Sequence[dict[str, Any]], device: Any, lvis: bool
    ) -> YoloDetector:
        return cls(
            weights=options.weights or cls.default_weights,
            categories=categories,
            device=device,
            max_det=_max_det(options, lvis),
            image_size=options.image_size or 640,
        )

    def __init__(
        self,
        *,
        weights: str | Path,
        categories: Sequence[dict[str, Any]],
        device: torch.device | str = "cpu",
        conf: float = 0.001,
        iou: float = 0.7,
        max_det: int = 100,
        image_size: int = 640,
    ) -> None:
        """
        Args:
          weights: ultralytics weights (``yolov8x.pt`` ...) or a model yaml.
          categories: the dataset's categories (ids and names).
          conf, iou, max_det, image_size: ultralytics' predict settings (the low confidence
            threshold is the usual one for AP).
        """
        # ultralytics logs to stdout at import (a settings-file notice on a fresh machine, among
        # others), which would land in the middle of evsam's own output; the user's choice wins.
        os.environ.setdefault("YOLO_VERBOSE", "false")
        try:
            from ultralytics import YOLO
        except ImportError:
            raise MissingDependencyError("ultralytics", "yolo", "the yolov8 detector") from None
        _undo_ultralytics_pil_patch()
        path = Path(weights)
        # A bare release name (yolov8x.pt) is resolved by ultralytics, which downloads it when online.
        if not path.is_file() and (len(path.parts) > 1 or path.suffix != ".pt"):
            raise CheckpointError(f"YOLOv8 weights not found: {path}")
        try:
            self.model = YOLO(str(path))
        except Exception as exc:  # ultralytics raises many types for a bad file
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[
                0
            ]  # ultralytics adds advice lines
            raise CheckpointError(f"cannot load YOLOv8 weights {path}: {reason}") from None
        self.mapping = class_to_category(dict(self.model.names), categories)
        import torch

        dev = torch.device(device)
        self.device = "cpu" if dev.type == "cpu" else f"{dev.type}:{dev.index or 0}"
        self.conf, self.iou, self.max_det, self.image_size = conf, iou, max_det, image_size

    def __call__(self, image: np.ndarray) -> list[dict[str, Any]]:
        bgr = np.ascontiguousarray(image[..., ::-1])  # ultralytics reads numpy images as BGR
        results: Any = self.model.predict(
            source=bgr,
            conf=self.conf,
            iou=self.iou,
            max_det=self.max_det,
            imgsz=self.image_size,
            device=self.device,
            verbose=False,
        )
        result = results[0]
        boxes = result.boxes.xyxy.cpu().double().numpy()
        classes = result.boxes.cls.cpu().numpy().astype(int)
        scores = result.boxes.conf.cpu().double().numpy()
        out = []
        for (x0, y0, x1, y1), cls, score in zip(boxes, classes, scores, strict=True):
            if int(cls) in self.mapping:
                out.append(
                    {
                        "category_id": self.mapping[int(cls)],
                        "bbox": [
                            round(float(x0), 2),
                            round(float(y0), 2),
                            round(float(x1 - x0), 2),
                            round(float(y1 - y0), 2),
                        ],
                        "score": round(float(score), 5),
                    }
                )
        return out


# ---------------------------------------------------------------------------- GroundingDINO
def split_prompts(names: Sequence[str], count_tokens: Any, max_tokens: int) -> list[list[int]]:
    """Greedily group category indices so each prompt ``"a . b . c ."`` fits ``max_tokens``."""
    groups: list[list[int]] = []
    current: list[int] = []
    for i in range(len(names)):
        trial = [*current, i]
        if current and count_tokens(make_caption([names[j] for j in trial])) > max_tokens:
            groups.append(current)
            trial = [i]
        if count_tokens(make_caption([names[i]])) > max_tokens:
            raise DataError(
                f"category name {names[i]!r} alone is longer than the text encoder's {max_tokens} tokens"
            )
        current = trial
    if current:
        groups.append(current)
    return groups


def make_caption(names: Sequence[str]) -> str:
    return " . ".join(names) + " ."


def caption_spans(names: Sequence[str]) -> list[tuple[int, int]]:
    """Character span of each name inside ``make_caption(names)``."""
    spans, pos = [], 0
    for name in names:
        spans.append((pos, pos + len(name)))
        pos += len(name) + 3
    return spans


@register_detector("groundingdino")
class GroundingDinoDetector(RegisteredDetector):
    @classmethod
    def from_options(
        cls, options: DetectorOptions, *, categories: Sequence[dict[str, Any]], device: Any, lvis: bool
    ) -> GroundingDinoDetector:
        if options.config is None or options.text_encoder is None:
            raise SettingError(
                "detector groundingdino needs config and text_encoder (a local BERT folder)",
                "detector",
                "config",
                "text_encoder",
            )
        size = options.image_size or 800
        return cls(
            config=options.config,
            weights=options.weights,  # type: ignore[arg-type]
            text_encoder=options.text_encoder,
            categories=categories,
            device=device,
            max_det=_max_det(options, lvis),
            image_size=size,
            max_size=round(size * 1333 / 800),
        )

    def __init__(
        self,
        *,
        config: str | Path,
        weights: str | Path,
        text_encoder: str | Path,
        categories: Sequence[dict[str, Any]],
        device: torch.device | str = "cpu",
        max_det: int = 100,
        image_size: int = 800,
        max_size: int = 1333,
    ) -> None:
        """
        Args:
          config: groundingdino-py config file (e.g. ``GroundingDINO_SwinT_OGC.py``).
          weights: its checkpoint (``groundingdino_swint_ogc.pth``, state dict under "model").
          text_encoder: a local folder with the BERT model and tokenizer (``bert-base-uncased``
            saved with ``save_pretrained``), so nothing is downloaded.
          categories: the dataset's categories; their names are the text prompt.
          max_det: boxes kept per image (the best query-category pairs).
          image_size, max_size: shorter/longer side limits of the detector's input.
        """
        import torch

        try:
            from groundingdino.models import build_model
            from groundingdino.util.slconfig import SLConfig
        except ImportError:
            raise MissingDependencyError("groundingdino-py", "gdino", "the groundingdino detector") from None
        for what, p in (("config", config), ("weights", weights)):
            if not Path(p).is_file():
                raise CheckpointError(f"GroundingDINO {what} file not found: {p}")
        if not Path(text_encoder).is_dir():
            raise CheckpointError(
                f"GroundingDINO text encoder folder not found: {text_encoder} (a local BERT folder)"
            )
        try:
            args = SLConfig.fromfile(str(config))
        except Exception as exc:  # SLConfig executes the config file
            raise CheckpointError(f"cannot read GroundingDINO config {config}: {exc}") from None
        args.device = str(device)
        args.text_encoder_type = str(Path(text_encoder).resolve())
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # it prints the text encoder path
                model = build_model(args)
        except OSError as exc:  # transformers cannot read the text encoder folder
            raise CheckpointError(
                f"cannot build GroundingDINO from {config} with text encoder {text_encoder}: {exc}"
            ) from None
        self._load(model, Path(weights))
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.tokenizer = model.tokenizer
        self.max_text_len = int(getattr(args, "max_text_len", 256))
        self.max_det, self.image_size, self.max_size = max_det, image_size, max_size
        self.category_ids = [int(c["id"]) for c in categories]
        self.names = [_norm(str(c["name"])) for c in categories]
        self.groups = split_prompts(
            self.names, lambda text: len(self.tokenizer(text)["input_ids"]), self.max_text_len
        )

    @staticmethod
    def _load(model: torch.nn.Module, path: Path) -> None:
        import argparse

        from ..models.checkpoints import load_file

        # The release file may carry its training arguments next to "model" as an
        # argparse.Namespace (a plain attribute holder): the one class allowed beyond weights.
        ckpt = load_file(path, what="GroundingDINO weights", allow=[argparse.Namespace])
        state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} holds no GroundingDINO state dict")
        state = {k.removeprefix("module."): v for k, v in state.items()}
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise CheckpointError(f"{path} does not fit the GroundingDINO config: {str(exc)[:300]}") from None
        if missing:
            raise CheckpointError(
                f"{path} does not fit the GroundingDINO config; missing keys: {', '.join(missing[:5])}"
            )
        if unexpected:  # the official release carries a few unused buffers (label_enc, position_ids)
            log.debug("GroundingDINO weights: unused keys %s", unexpected[:5])

    def _input(self, image: np.ndarray) -> torch.Tensor:
        """Resize (shorter side ``image_size``, longer at most ``max_size``) and normalise."""
        import torch
        import torch.nn.functional as F

        h, w = image.shape[:2]
        size = self.image_size
        if max(h, w) / min(h, w) * size > self.max_size:
            size = int(round(self.max_size * min(h, w) / max(h, w)))
        oh, ow = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(255)
        x = F.interpolate(x[None], (oh, ow), mode="bilinear", align_corners=False)[0]
        mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
        return ((x - mean) / std).to(self.device)

    def _positive_map(self, names: Sequence[str], caption: str, width: int) -> torch.Tensor:
        """(C, width) token weights of each category (uniform over its tokens, within max_text_len)."""
        import torch

        tokenized = self.tokenizer(caption)
        pos = torch.zeros(len(names), width)
        for c, (start, end) in enumerate(caption_spans(names)):
            tokens = {tokenized.char_to_token(i) for i in range(start, end)} - {None}
            for t in tokens:
                if t < min(width, self.max_text_len):
                    pos[c, t] = 1.0
        return pos / pos.sum(1, keepdim=True).clamp(min=1)

    def __call__(self, image: np.ndarray) -> list[dict[str, Any]]:
        import torch

        with torch.inference_mode():
            return self._detect(image)

    def _detect(self, image: np.ndarray) -> list[dict[str, Any]]:
        import torch

        h, w = image.shape[:2]
        x = self._input(image)
        scores, boxes, cats = [], [], []
        for group in self.groups:
            names = [self.names[i] for i in group]
            caption = make_caption(names)
            with warnings.catch_warnings():  # checkpointing/autocast deprecation notices from its code
                warnings.simplefilter("ignore", UserWarning)
                warnings.simplefilter("ignore", FutureWarning)
                out = self.model(x[None], captions=[caption])
            prob = out["pred_logits"][0].float().sigmoid().cpu()  # (queries, max_text_len)
            pos = self._positive_map(names, caption, prob.shape[1])
            per_cat = prob @ pos.T  # (queries, C)
            scores.append(per_cat.flatten())
            boxes.append(out["pred_boxes"][0].float().cpu().repeat_interleave(len(group), dim=0))
            cats.append(torch.tensor(group).repeat(per_cat.shape[0]))
        all_scores, all_boxes, all_cats = torch.cat(scores), torch.cat(boxes), torch.cat(cats)
        top = torch.topk(all_scores, min(self.max_det, all_scores.numel())).indices
        out_dets = []
        for i in top.tolist():
            cx, cy, bw, bh = all_boxes[i].tolist()
            score = float(all_scores[i])
            if not math.isfinite(score):
                continue
            out_dets.append(
                {
                    "category_id": self.category_ids[int(all_cats[i])],
                    "bbox": [
                        round((cx - bw / 2) * w, 2),
                        round((cy - bh / 2) * h, 2),
                        round(bw * w, 2),
                        round(bh * h, 2),
                    ],
                    "score": round(score, 5),
                }
            )
        return out_dets

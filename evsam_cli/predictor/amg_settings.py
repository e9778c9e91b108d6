"""The settings of automatic mask generation ("segment everything"), declared once.

``AmgSettings`` is what ``AutomaticMaskGenerator`` takes (as keyword arguments or one object),
what ``predict_everything`` records in ``masks.json`` and where ``evsam predict --everything``
reads its defaults and help. Names and defaults are segment-anything's
``SamAutomaticMaskGenerator``'s. Importing this module needs neither torch nor numpy, so the
command line can build its help from it instantly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import SettingError

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


class AmgConfigError(SettingError):
    """An automatic-mask-generator setting is missing, contradictory or out of range."""


def _setting(default: Any, help: str, **kwargs: Any) -> Any:
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass(frozen=True)
class AmgSettings:
    """Settings of ``AutomaticMaskGenerator``, checked on construction (``AmgConfigError``)."""

    points_per_side: int | None = _setting(
        32,
        "Grid points per side: points_per_side**2 prompts on the image and on every crop "
        "(divided by crop_n_points_downscale_factor**i in crop layer i).",
    )
    points_per_batch: int = _setting(128, "Prompts decoded per decoder pass (memory grows with it).")
    pred_iou_thresh: float = _setting(0.88, "Keep masks whose predicted IoU is above this (0: keep all).")
    stability_score_thresh: float = _setting(
        0.95, "Keep masks whose stability score is at least this (0: keep all)."
    )
    stability_score_offset: float = _setting(1.0, "Logit offset of the stability score.")
    box_nms_thresh: float = _setting(0.7, "Box IoU above which the lower-scored duplicate in a crop goes.")
    crop_n_layers: int = _setting(0, "Extra layers of image crops; layer i cuts (2**i)**2 crops.")
    crop_nms_thresh: float = _setting(0.7, "Box IoU for duplicates between crops (smaller crops win).")
    crop_overlap_ratio: float = _setting(512 / 1500, "Overlap of layer-1 crops, share of the short side.")
    crop_n_points_downscale_factor: int = _setting(1, "See points_per_side.")
    point_grids: Sequence[Any] | None = _setting(
        None,
        "Explicit grids, one (K, 2) array of x, y in [0, 1] per crop layer.",
        compare=False,
    )
    min_mask_region_area: int = _setting(
        0, "Fill holes and drop islands smaller than this many pixels, then NMS again (0: off)."
    )
    output_mode: str = _setting("binary_mask", "binary_mask, uncompressed_rle or coco_rle.")

    def __post_init__(self) -> None:
        if (self.points_per_side is None) == (self.point_grids is None):
            raise AmgConfigError(
                "give exactly one of points_per_side and point_grids", "points_per_side", "point_grids"
            )
        _check_int("points_per_batch", self.points_per_batch, 1)
        _check_int("crop_n_layers", self.crop_n_layers, 0)
        _check_int("crop_n_points_downscale_factor", self.crop_n_points_downscale_factor, 1)
        _check_int("min_mask_region_area", self.min_mask_region_area, 0)
        for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh", "crop_nms_thresh"):
            self._float(name, 0.0, 1.0)
        self._float("stability_score_offset", 0.0, math.inf)
        self._float("crop_overlap_ratio", 0.0, 1.0, high_open=True)
        if self.output_mode not in OUTPUT_MODES:
            raise AmgConfigError(
                f"output_mode must be one of {', '.join(OUTPUT_MODES)}; got {self.output_mode!r}",
                "output_mode",
            )
        if self.points_per_side is not None:
            _check_int("points_per_side", self.points_per_side, 1)
            layers, factor = self.crop_n_layers, self.crop_n_points_downscale_factor
            if int(self.points_per_side / factor**layers) < 1:
                raise AmgConfigError(
                    f"points_per_side={self.points_per_side} leaves no points in crop layer {layers} "
                    f"after dividing by crop_n_points_downscale_factor={factor}**{layers}",
                    "points_per_side",
                    "crop_n_points_downscale_factor",
                )
        else:
            assert self.point_grids is not None
            grids = tuple(_check_grid(i, g) for i, g in enumerate(self.point_grids))
            if len(grids) < self.crop_n_layers + 1:
                raise AmgConfigError(
                    f"point_grids has {len(grids)} grid(s) but crop_n_layers={self.crop_n_layers} needs "
                    f"{self.crop_n_layers + 1} (one per layer, the whole image first)",
                    "point_grids",
                    "crop_n_layers",
                )
            object.__setattr__(self, "point_grids", grids)

    def _float(self, name: str, low: float, high: float, *, high_open: bool = False) -> None:
        value = getattr(self, name)
        ok = _is_number(value)
        if ok:
            v = float(value)
            ok = math.isfinite(v) and low <= v and (v < high if high_open else v <= high)
        if not ok:
            bound = f"[{low:g}, {high:g})" if high_open else f"[{low:g}, {high:g}]"
            raise AmgConfigError(f"{name} must be a number in {bound}; got {value!r}", name)
        object.__setattr__(self, name, float(value))

    def layer_grids(self) -> list[Any]:
        """The point grid of every crop layer: (K, 2) float64 arrays of x, y in [0, 1]."""
        if self.point_grids is not None:
            return list(self.point_grids)
        from .amg_utils import build_layer_point_grids

        assert self.points_per_side is not None
        return build_layer_point_grids(
            self.points_per_side, self.crop_n_layers, self.crop_n_points_downscale_factor
        )

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready values (explicit grids as nested lists)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.point_grids is not None:
            out["point_grids"] = [g.tolist() for g in self.point_grids]
        return out

    @classmethod
    def default(cls, name: str) -> Any:
        return cls.__dataclass_fields__[name].default

    @classmethod
    def help(cls, name: str) -> str:
        return str(cls.__dataclass_fields__[name].metadata["help"])


def _is_number(value: Any) -> bool:
    import numbers

    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_int(name: str, value: Any, low: int) -> None:
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise AmgConfigError(f"{name} must be an integer >= {low}; got {value!r}", name)


def _check_grid(i: int, grid: Any) -> Any:
    import numpy as np

    arr = np.asarray(grid, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2 or len(arr) == 0:
        raise AmgConfigError(
            f"point_grids[{i}] must be a non-empty (K, 2) array of x, y; got shape {arr.shape}", "point_grids"
        )
    if not np.all(np.isfinite(arr)) or arr.min() < 0.0 or arr.max() > 1.0:
        raise AmgConfigError(f"point_grids[{i}] must hold coordinates normalised to [0, 1]", "point_grids")
    return arr

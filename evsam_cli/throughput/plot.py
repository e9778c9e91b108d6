"""Throughput vs accuracy plot: measured images/s against the paper's COCO mAP or the user's metrics."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import DataError, MissingDependencyError
from ..utils.io import atomic_path
from .reference import paper_figures


def read_metrics(paths: Sequence[str | os.PathLike[str]]) -> dict[str, tuple[float, str]]:
    """``evsam eval`` metrics.json files -> {model: (accuracy, label)}.

    Detector prompts give segm AP; box/point prompts give mIoU (both percent).
    """
    out: dict[str, tuple[float, str]] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"metrics file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"malformed JSON in {path}: {exc}") from None
        if not isinstance(data, dict) or not data.get("model"):
            raise DataError(f'{path} is not an evsam metrics.json (no "model")')
        from ..models import resolve_name

        model = resolve_name(str(data["model"]))
        segm, miou = data.get("segm") or {}, data.get("miou") or {}
        if segm.get("AP") is not None:
            out[model] = (
                float(segm["AP"]),
                f"{data.get('dataset', '')} mask AP ({data.get('detector') or 'detector'} prompts)",
            )
        elif miou.get("all") is not None:
            out[model] = (
                float(miou["all"]),
                f"{data.get('dataset', '')} mIoU ({data.get('prompt', '')} prompts)",
            )
        else:
            raise DataError(f"{path} has neither segm.AP nor miou.all")
    return out


def plot_throughput(
    records: Sequence[dict[str, Any]],
    path: str | os.PathLike[str],
    *,
    metrics: dict[str, tuple[float, str]] | None = None,
) -> Path:
    """Write a PNG: measured end-to-end images/s (log x) against accuracy, one labelled point per model.

    Accuracy is the user's (``metrics``) where given, else the paper's COCO mAP (ViTDet boxes);
    models with neither are left out (and listed in the caption).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError("matplotlib", "all", "--plot") from None
    points, skipped, labels = [], [], set()
    for rec in records:
        model = rec["model"]
        if metrics and model in metrics:
            acc, label = metrics[model]
        else:
            fig = paper_figures(model)
            if fig is None or fig.coco_map is None:
                skipped.append(model)
                continue
            acc, label = fig.coco_map, "COCO mAP, ViTDet boxes (paper)"
        labels.add(label)
        points.append((rec["end_to_end"]["images_per_s"], acc, model))
    if not points:
        raise DataError(
            "nothing to plot: no benchmarked model has an accuracy figure (give metrics files)"
        ).naming("metrics")
    figure, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for x, y, model in points:
        ax.scatter([x], [y], s=40)
        ax.annotate(
            model.replace("efficientvit-sam-", "EViT-SAM-").upper(),
            (x, y),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
        )
    first = records[0]
    ax.set_xscale("log")
    ax.set_xlabel(
        f"end-to-end images/s ({first['engine']}, {first['dtype']}, batch {first['batch_size']}, {first['device_name']})"
    )
    ax.set_ylabel(" / ".join(sorted(labels)))
    title = "Throughput vs accuracy"
    if skipped:
        title += f" (no accuracy for: {', '.join(skipped)})"
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return path

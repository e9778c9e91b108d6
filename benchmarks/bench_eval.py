"""Box-prompt COCO evaluation: `evsam eval` against the official EfficientViT-SAM evaluation loop.

Both sides evaluate EfficientViT-SAM L0 with the same weights on the same generated COCO-format
set on this machine. The official side is the loop of the official ``eval_efficientvit_sam_model.py``
(``run_box``), driven through the ``efficientsam==1.0.0`` package (a packaging of the official
code): per image, the annotations are looked up, the image is read and embedded with
``EfficientViTSamPredictor.set_image``, and every GT box goes through one ``predict`` call
(multimask output, best predicted IoU). evsam's side is ``evsam_cli.evaluation.evaluate``.

Both sides' per-instance IoUs are computed with the same formula (intersection / union, percent)
so that identical masks give identical metrics; the official script adds 1e-7 to the union,
a relative difference below 1e-9. The report says whether the metrics are identical and the
largest difference: the two implementations of the network agree to about 1e-6 in the image
embedding, which can flip a pixel whose mask logit is within that of the threshold. Timings are the best of ``--repeats`` alternating runs (the
machine may be shared), each the whole evaluation: building the model from the weights file,
reading images and annotations, encoding, decoding and scoring.

    python benchmarks/bench_eval.py --images 20 --size 640 --repeats 2 --json bench_eval.json

With ``--prompt detector`` both sides take detector boxes instead (``evsam eval --detector
vitdet``): ``--boxes-per-image`` boxes per image (ViTDet's density on COCO is about 40), GT
boxes jittered by up to a tenth of their size plus random boxes, written as a COCO-results JSON.
The official side is its ``box_from_detector`` loop (one ``predict`` per box, the best mask
RLE-encoded); both results are scored by the same COCO mask AP code.

    python benchmarks/bench_eval.py --prompt detector --boxes-per-image 40 --images 12 --size 640

``--write-set DIR`` writes the same set (``DIR/coco``), its detections (``DIR/dense_detections.json``)
and the weights (``DIR/l0.pt``) to keep, and stops: for timing ``evsam eval`` itself on them, e.g.
in one process against ``torchrun`` shards (docs/eval.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from evsam_cli import tune_cpu_allocator
from evsam_cli.data.synthetic import write_coco
from evsam_cli.evaluation import evaluate
from evsam_cli.evaluation.datasets import annotation_to_mask, bbox_xywh_to_xyxy
from evsam_cli.evaluation.metrics import coco_segm_metrics, mask_iou, miou_summary
from evsam_cli.evaluation.runner import DetectorOptions
from evsam_cli.models import create_model, save_weights


def official_box_loop(predictor: Any, image_dir: Path, ann_file: Path) -> tuple[list[float], list[float]]:
    """The official run_box loop (single process): areas and IoUs in dataset order."""
    data = json.loads(ann_file.read_text())
    annotations = data["annotations"]
    areas, ious = [], []
    for im in data["images"]:
        anns = [a for a in annotations if a["image_id"] == im["id"]]  # as the official dataset does
        image = np.array(Image.open(image_dir / im["file_name"]).convert("RGB"))
        predictor.set_image(image)
        for ann in anns:
            if ann["area"] < 1:
                continue
            gt = annotation_to_mask(ann, image.shape[0], image.shape[1])
            box = np.array(bbox_xywh_to_xyxy(ann["bbox"]))
            masks, iou_pred, _ = predictor.predict(
                point_coords=None, point_labels=None, box=box, multimask_output=True
            )
            pred = masks[iou_pred.argmax()]
            areas.append(float(ann["area"]))
            ious.append(float(mask_iou(torch.as_tensor(pred)[None], torch.as_tensor(gt)[None])[0]))
    return areas, ious


def official_detector_loop(predictor: Any, image_dir: Path, ann_file: Path, detections: Path) -> list[dict]:
    """The official box_from_detector loop (single process): COCO results in detection order."""
    data = json.loads(ann_file.read_text())
    dets = json.loads(detections.read_text())
    results = []
    for im in data["images"]:
        boxes = [d for d in dets if d["image_id"] == im["id"]]
        if not boxes:
            continue
        image = np.array(Image.open(image_dir / im["file_name"]).convert("RGB"))
        predictor.set_image(image)
        for d in boxes:
            box = np.array(bbox_xywh_to_xyxy(d["bbox"]))
            masks, iou_pred, _ = predictor.predict(
                point_coords=None, point_labels=None, box=box, multimask_output=True
            )
            rle = mask_utils.encode(np.asfortranarray(masks[iou_pred.argmax()].astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            results.append(
                {
                    "image_id": im["id"],
                    "category_id": d["category_id"],
                    "segmentation": rle,
                    "score": d["score"],
                }
            )
    return results


def dense_detections(ann_file: Path, out: Path, per_image: int, seed: int) -> int:
    """``per_image`` detection boxes per image (jittered GT boxes, then random ones) -> count."""
    rng = np.random.default_rng(seed)
    data = json.loads(ann_file.read_text())
    cats = [c["id"] for c in data["categories"]]
    dets = []
    for im in data["images"]:
        h, w = im["height"], im["width"]
        gt = [a for a in data["annotations"] if a["image_id"] == im["id"]]
        for k in range(per_image):
            if k < len(gt):
                x, y, bw, bh = gt[k]["bbox"]
                dx, dy, dw, dh = rng.uniform(-0.1, 0.1, 4) * [bw, bh, bw, bh]
                box, cat = [x + dx, y + dy, bw + dw, bh + dh], gt[k]["category_id"]
            else:
                bw, bh = rng.uniform(0.05, 0.5) * w, rng.uniform(0.05, 0.5) * h
                box, cat = [rng.uniform(0, w - bw), rng.uniform(0, h - bh), bw, bh], int(rng.choice(cats))
            x, y, bw, bh = box
            x, y = max(0.0, x), max(0.0, y)
            bw, bh = max(1.0, min(bw, w - x)), max(1.0, min(bh, h - y))
            score = float(rng.uniform(0.5, 1.0) if k < len(gt) else rng.uniform(0.05, 0.6))
            dets.append({"image_id": im["id"], "category_id": cat, "bbox": [x, y, bw, bh], "score": score})
    out.write_text(json.dumps(dets))
    return len(dets)


def write_set(root: Path, args: argparse.Namespace) -> tuple[dict[str, Path], Path, Path]:
    """The benchmark's set (``root/coco``), its dense detections and the L0 weights under
    ``root`` -> (the set's paths, the detections file, the weights file)."""
    paths = write_coco(
        root / "coco",
        num_images=args.images,
        image_size=args.size,
        objects_per_image=tuple(args.objects),
        seed=args.seed,
    )
    detections = root / "dense_detections.json"
    dense_detections(paths["annotations"], detections, args.boxes_per_image, args.seed)
    torch.manual_seed(args.seed)
    weights = save_weights(create_model("efficientvit-sam-l0"), root / "l0.pt")
    return paths, detections, weights


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--size", type=int, default=640, help="longest image side, as COCO")
    parser.add_argument("--objects", type=int, nargs=2, default=(4, 12), help="objects per image (min max)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=None, help="reader threads (default: evaluate's)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: evaluate's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", choices=("box", "detector"), default="box")
    parser.add_argument("--boxes-per-image", type=int, default=40, help="detector boxes per image")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--write-set", type=Path, default=None, help="write the set, detections and weights here; stop"
    )
    args = parser.parse_args()
    if args.write_set is not None:
        write_set(args.write_set, args)
        print(f"{args.images} images, their detections and L0 weights in {args.write_set}")
        return
    # As the evsam command does at start; it applies to both implementations in this process.
    tune_cpu_allocator()

    from efficientsam.models.efficientvit.sam import EfficientViTSamPredictor
    from efficientsam.sam_model_zoo import create_efficientvit_sam_model

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths, detections, weights = write_set(root, args)

        official_s, evsam_s = [], []
        official_result: tuple[list[float], list[float]] = ([], [])
        official_dets: list[dict] = []
        metrics: dict[str, Any] = {}
        official_metrics: dict[str, Any] = {}
        for r in range(args.repeats):
            t0 = time.perf_counter()
            official = create_efficientvit_sam_model("efficientvit-sam-l0", True, str(weights)).eval()
            predictor = EfficientViTSamPredictor(official)
            # Timed to the final metric, as `evsam eval` is (it scores and writes its files).
            if args.prompt == "detector":
                official_dets = official_detector_loop(
                    predictor, paths["images"], paths["annotations"], detections
                )
                official_metrics = coco_segm_metrics(
                    json.loads(paths["annotations"].read_text()), official_dets
                )
            else:
                official_result = official_box_loop(predictor, paths["images"], paths["annotations"])
                official_metrics = miou_summary(*official_result)
            official_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            metrics = evaluate(
                dataset="coco",
                output=root / f"out{r}",
                data_root=root / "coco",
                model="efficientvit-sam-l0",
                checkpoint=str(weights),
                prompt=args.prompt,
                detector=DetectorOptions(name="vitdet", detections=detections),
                workers=args.workers,
                batch_size=args.batch_size,
            )
            evsam_s.append(time.perf_counter() - t0)
            print(f"run {r}: official {official_s[-1]:.2f} s, evsam {evsam_s[-1]:.2f} s")

        if args.prompt == "detector":
            ours = metrics["segm"]
            instances = len(official_dets)
            # With random weights AP is near 0 on both sides; the masks themselves are compared too.
            mine = json.loads((root / f"out{args.repeats - 1}" / "predictions.json").read_text())
            ours = {
                **ours,
                "masks_identical": sum(
                    a["segmentation"] == b["segmentation"] for a, b in zip(mine, official_dets, strict=False)
                ),
                "masks": len(mine),
            }
        else:
            ours = metrics["miou"]
            instances = len(official_result[0])
        identical = official_metrics == ours
        max_diff = max(abs((official_metrics[k] or 0) - (ours[k] or 0)) for k in official_metrics)
        identical = identical or all(ours.get(k) == v for k, v in official_metrics.items())
        report = {
            "machine": {
                "cpu": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
            },
            "images": args.images,
            "prompt": args.prompt,
            "instances": instances,
            "official_seconds": round(min(official_s), 3),
            "evsam_seconds": round(min(evsam_s), 3),
            # every run, in order: the first run in a process is the slowest (see docs/benchmarks.md)
            "official_runs": [round(t, 3) for t in official_s],
            "evsam_runs": [round(t, 3) for t in evsam_s],
            "speedup": round(min(official_s) / min(evsam_s), 2),
            "official_metrics": official_metrics,
            "evsam_metrics": ours,
            "metrics_identical": identical,
            "max_abs_metric_difference": max_diff,
        }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

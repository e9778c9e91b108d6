"""Benchmark: evsam's AutomaticMaskGenerator against the official EfficientViT-SAM generator.

Both generators get the same weights, the same image and the same settings; the script reports
both wall times, the speed-up, and how well the masks agree (counts, IoU of matched masks).

The weights are random but fixed (no network access is needed). Untrained weights predict IoUs
near 0 and flat logits, so every mask would fail the default thresholds and the comparison would
be empty; the script therefore shifts the IoU head's output bias by +0.9 and scales the
hypernetwork output layers by 100, which gives predicted IoUs around 0.85 +- 0.07 and sharp
logits: a realistic share of masks passes pred_iou_thresh=0.88 and stability_score_thresh=0.95.
Both models load that same state dict (the official one is saved with torch.save and loaded by
``create_model(name, checkpoint=file)``).

Usage:
  python benchmarks/bench_amg.py                       # L0, 32x32 points, 768x1024 image
  python benchmarks/bench_amg.py --points-per-side 16 --box-nms-thresh 1.0 --json out.json
  python benchmarks/bench_amg.py --peak-rss 375x500 1500x1500   # evsam's peak memory only

``--peak-rss HxW ...`` runs evsam's generator (the settings above, same weights) once per image
size, each in a fresh Python process, and reports the process's peak resident set size
(``ru_maxrss``: the model, PyTorch and everything the generation allocated), as ``evsam predict
--everything`` would use it.
Needs ``efficientsam==1.0.0`` (pip install 'evsam[dev]').
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from evsam_cli import tune_cpu_allocator


def official_model(name: str, seed: int) -> torch.nn.Module:
    from efficientsam.sam_model_zoo import create_efficientvit_sam_model

    torch.manual_seed(seed)
    model = create_efficientvit_sam_model(name, pretrained=False).eval()
    with torch.no_grad():
        model.mask_decoder.iou_prediction_head.layers[-1].bias += 0.9
        for mlp in model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight *= 100
    return model


def match_masks(ours: list[np.ndarray], ref: list[np.ndarray]) -> dict:
    """Greedy one-to-one matching by mask IoU (best pairs first)."""
    if not ours or not ref:
        return {"matched": 0, "mean_iou": None, "min_iou": None, "identical": 0}
    a = torch.from_numpy(np.stack([m.ravel() for m in ours])).float()
    b = torch.from_numpy(np.stack([m.ravel() for m in ref])).float()
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    iou = (inter / union.clamp_min(1)).numpy()
    pairs = []
    used_a, used_b = set(), set()
    for flat in np.argsort(-iou, axis=None):
        i, j = np.unravel_index(flat, iou.shape)
        if i in used_a or j in used_b:
            continue
        used_a.add(i)
        used_b.add(j)
        pairs.append(float(iou[i, j]))
        if len(pairs) == min(len(ours), len(ref)):
            break
    identical = sum(1 for p in pairs if p == 1.0)
    return {
        "matched": len(pairs),
        "mean_iou": float(np.mean(pairs)),
        "min_iou": float(min(pairs)),
        "identical": identical,
    }


def machine() -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()[
            :20
        ]
    except OSError:
        lscpu = []
    return {
        "platform": platform.platform(),
        "cpu": next((line.split(":", 1)[1].strip() for line in lscpu if line.startswith("Model name")), None),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg": os.getloadavg(),
        "lscpu": lscpu,
    }


def peak_rss_child(args: argparse.Namespace) -> None:
    """In a fresh process: build the model, generate masks for one image, print the peak RSS."""
    import resource

    from evsam_cli.data.synthetic import synth_image
    from evsam_cli.models import create_model
    from evsam_cli.predictor.automatic import AutomaticMaskGenerator

    h, w = (int(v) for v in args.rss_child.split("x"))
    torch.manual_seed(args.seed)
    model = create_model(args.model).eval()
    with torch.no_grad():  # the official_model shifts, so that masks pass the thresholds
        model.mask_decoder.iou_prediction_head.layers[-1].bias += 0.9
        for mlp in model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight *= 100
    image, _, _ = synth_image(np.random.default_rng(args.seed), h, w, 12)
    gen = AutomaticMaskGenerator(
        model,
        points_per_side=args.points_per_side,
        points_per_batch=args.points_per_batch,
        pred_iou_thresh=args.pred_iou_thresh,
        stability_score_thresh=args.stability_score_thresh,
        box_nms_thresh=args.box_nms_thresh,
        crop_n_layers=args.crop_n_layers,
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    masks = gen.generate(image)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "size": [h, w],
                "masks": len(masks),
                "seconds": seconds,
                "rss_before_mb": before,
                "peak_rss_mb": peak,
            }
        )
    )


def peak_rss(args: argparse.Namespace) -> None:
    """``peak_rss_child`` for every ``--peak-rss`` size, each in its own process."""
    import sys

    rows = []
    passed = [
        f"--{k.replace('_', '-')}={v}"
        for k, v in vars(args).items()
        if k not in ("peak_rss", "rss_child", "json") and v is not None
    ]
    for size in args.peak_rss:
        out = subprocess.run(
            [sys.executable, __file__, *passed, "--rss-child", size],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"peak_rss": rows, "machine": machine()}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="efficientvit-sam-l0")
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--pred-iou-thresh", type=float, default=0.88)
    parser.add_argument("--stability-score-thresh", type=float, default=0.95)
    parser.add_argument("--box-nms-thresh", type=float, default=0.7)
    parser.add_argument("--crop-n-layers", type=int, default=0)
    parser.add_argument("--points-per-batch", type=int, default=128, help="ours (official: its default 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--peak-rss", nargs="+", metavar="HxW", default=None, help="evsam's peak RSS per image size"
    )
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    # As the evsam command does at start; it applies to both implementations in this process.
    tune_cpu_allocator()
    if args.rss_child:
        return peak_rss_child(args)
    if args.peak_rss:
        return peak_rss(args)

    from efficientsam.models.efficientvit.sam import EfficientViTSamAutomaticMaskGenerator

    from evsam_cli.data.synthetic import synth_image
    from evsam_cli.models import create_model
    from evsam_cli.predictor.automatic import AutomaticMaskGenerator

    ref = official_model(args.model, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.pt"
        torch.save(ref.state_dict(), path)
        ours = create_model(args.model, checkpoint=str(path)).eval()
    image, _, _ = synth_image(np.random.default_rng(args.seed), args.height, args.width, 12)
    settings = {
        "points_per_side": args.points_per_side,
        "pred_iou_thresh": args.pred_iou_thresh,
        "stability_score_thresh": args.stability_score_thresh,
        "box_nms_thresh": args.box_nms_thresh,
        "crop_n_layers": args.crop_n_layers,
    }
    gen_ours = AutomaticMaskGenerator(ours, points_per_batch=args.points_per_batch, **settings)
    gen_ref = EfficientViTSamAutomaticMaskGenerator(ref, **settings)
    load_start = os.getloadavg()

    # Warm-up (first-call allocations, oneDNN kernel selection) on a tiny grid.
    for gen in (
        AutomaticMaskGenerator(ours, points_per_side=2),
        EfficientViTSamAutomaticMaskGenerator(ref, points_per_side=2),
    ):
        gen.generate(image)

    # Wall time, and the CPU time this process used (steadier than wall time on a shared machine).
    t0, c0 = time.perf_counter(), time.process_time()
    rec_ours = gen_ours.generate(image)
    t_ours, c_ours = time.perf_counter() - t0, time.process_time() - c0
    print(
        f"evsam:    {len(rec_ours)} masks in {t_ours:.1f} s (cpu {c_ours:.1f} s) {gen_ours.timings}",
        flush=True,
    )
    t0, c0 = time.perf_counter(), time.process_time()
    rec_ref = gen_ref.generate(image)
    t_ref, c_ref = time.perf_counter() - t0, time.process_time() - c0
    print(f"official: {len(rec_ref)} masks in {t_ref:.1f} s (cpu {c_ref:.1f} s)", flush=True)

    agreement = match_masks([r["segmentation"] for r in rec_ours], [r["segmentation"] for r in rec_ref])
    same_order = [
        bool(np.array_equal(a["segmentation"], b["segmentation"]))
        for a, b in zip(rec_ours, rec_ref, strict=False)
    ]
    result = {
        "model": args.model,
        "image_size": [args.height, args.width],
        "settings": settings,
        "points_per_batch": {"evsam": args.points_per_batch, "official": 64},
        "evsam": {
            "seconds": t_ours,
            "cpu_seconds": c_ours,
            "masks": len(rec_ours),
            "timings": gen_ours.timings,
        },
        "official": {"seconds": t_ref, "cpu_seconds": c_ref, "masks": len(rec_ref)},
        "speedup": t_ref / t_ours,
        "cpu_speedup": c_ref / c_ours,
        "agreement": {**agreement, "identical_in_order": sum(same_order)},
        "machine": {**machine(), "loadavg_start": load_start},
    }
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))
    print(
        f"machine: {result['machine']['cpu']}, {result['machine']['cpus']} CPUs, load {load_start} -> "
        f"{result['machine']['loadavg']}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

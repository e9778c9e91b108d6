"""Distillation throughput with the teacher cache cold vs warm (a benchmark, not a test).

Writes a small SA-1B-format set and a random SAM ViT teacher in Meta's layout (throughput does
not depend on the weights), then runs one epoch of ``evsam distill`` twice against the same
``--teacher-cache``: first cold (every image goes through the teacher, embeddings are stored),
then warm (every embedding is read back; the teacher is never built). Prints a table and JSON.

    python benchmarks/bench_distill.py --images 8 --batch-size 2 --teacher vit_b --student l0
    python benchmarks/bench_distill.py --image-size 256 --json bench_distill.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from evsam_cli.data.synthetic import write_sa1b
from evsam_cli.models import create_model, export_state_dict, get_spec
from evsam_cli.train.config import DataConfig, DistillConfig, LoopConfig, OptimConfig
from evsam_cli.train.distill import TEACHER_MODELS, distill
from evsam_cli.utils.devices import device_name, resolve_device


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher", default="vit_b", choices=sorted(TEACHER_MODELS))
    parser.add_argument("--student", default="efficientvit-sam-l0")
    parser.add_argument("--image-size", type=int, default=None, help="student input (default: its own)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_sa1b(root / "sa1b", num_images=args.images, image_size=640, seed=0)
        teacher_file = root / "teacher.pth"
        torch.save(export_state_dict(create_model(TEACHER_MODELS[args.teacher])), teacher_file)
        steps = -(-args.images // args.batch_size)  # one epoch
        results = {}
        for phase in ("cold", "warm"):
            cfg = DistillConfig(
                teacher=args.teacher,
                teacher_checkpoint=str(teacher_file),
                student=args.student,
                image_size=args.image_size,
                teacher_cache=str(root / "cache"),
                loop=LoopConfig(
                    output=str(root / phase),
                    steps=steps,
                    log_every=1,
                    save_every=10**6,
                    val_every=0,
                    device=args.device,
                ),
                optim=OptimConfig(warmup_steps=1),
                data=DataConfig(
                    path=str(root / "sa1b"), batch_size=args.batch_size, workers=args.workers, val_images=0
                ),
            )
            start = time.perf_counter()
            summary = distill(cfg)
            wall = time.perf_counter() - start
            records = [json.loads(line) for line in (root / phase / "metrics.jsonl").read_text().splitlines()]
            train = [r for r in records if "loss" in r]
            results[phase] = {
                "images": summary["images"],
                "train_seconds": round(summary["seconds"], 2),
                "wall_seconds_incl_startup": round(wall, 2),
                "images_per_s": round(summary["images_per_s"], 4),
                "teacher_forwards": summary["teacher_forwards"],
                "cache_hits": sum(r["cache_hits"] for r in train),
                "mean_data_wait_s_per_step": round(sum(r["data_wait_s"] for r in train) / len(train), 4),
            }
    device = resolve_device(args.device)
    report = {
        "teacher": args.teacher,
        "student": args.student,
        "student_input": args.image_size or get_spec(args.student).input_size,
        "batch_size": args.batch_size,
        "device": str(device),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        **results,
        "speedup_warm_vs_cold": round(results["warm"]["images_per_s"] / results["cold"]["images_per_s"], 2),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

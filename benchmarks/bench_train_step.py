"""Kernel time and page faults of a full CPU finetune step under each glibc allocator setting.

    python benchmarks/bench_train_step.py --model l0 --batch-size 2 --masks 16 --steps 4 --rounds 2

Each setting (``off``: glibc defaults, ``inference``: what the ``evsam`` command applies at start,
``training``: what distill/finetune add on CPU) runs in its own process, since the setting is
process-wide; the processes are interleaved over ``--rounds`` so a shared machine's load falls on
every setting alike. Per step: wall, user and system seconds, minor page faults, and the resident
set after the step (to see that memory held for reuse stays bounded). Medians leave out each
process's first step. Random weights and inputs: the cost of a step does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

SETTINGS = ("off", "inference", "training")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def add_step_arguments(ap: argparse.ArgumentParser, *, steps: int, steps_help: str) -> None:
    """The options of one training step's size, shared with ``bench_finetune_frozen.py``."""
    ap.add_argument("--model", default="l0")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--masks", type=int, default=16, help="masks (prompts) per image")
    ap.add_argument("--steps", type=int, default=steps, help=steps_help)


def training_run(args: argparse.Namespace, *, frozen: bool) -> tuple[Any, Any, Any, dict[str, Any]]:
    """(model, loss, optimizer, batch) of one finetune step on random inputs; with ``frozen`` the
    encoder is frozen and the batch carries embeddings (a warm cache) instead of images."""
    import torch

    from evsam_cli.models import create_model
    from evsam_cli.train.finetune import FinetuneLoss, PromptedSam

    b, k = args.batch_size, args.masks
    sam = create_model(args.model, input_size=args.image_size)
    model = PromptedSam(sam, freeze_encoder=frozen).train()
    loss = FinetuneLoss(torch.device("cpu"), focal_weight=20, dice_weight=1, embed=lambda lk: lk["emb"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    s = sam.input_size
    batch: dict[str, Any] = {
        "masks": torch.rand(b, k, s, s) > 0.5,
        "boxes": torch.tensor([[[10.0, 10.0, s - 12.0, s - 12.0]] * k] * b),
        "points": torch.rand(b, k, 3, 2) * s,
        "point_labels": torch.ones(b, k, 3),
        "use_box": torch.arange(b) % 2 == 0,
    }
    if frozen:
        batch["lookup"] = {"emb": torch.randn(b, 256, 64, 64), "hit_index": list(range(b)), "miss_index": []}
    else:
        batch["image"] = torch.randint(0, 255, (b, 3, s, s), dtype=torch.uint8)
        batch["image_hw"] = torch.tensor([[s, s]] * b)
    return model, loss, opt, batch


def train_step(model: Any, loss: Any, opt: Any, batch: dict[str, Any]) -> None:
    value, _ = loss(model, batch)
    value.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _one(args: argparse.Namespace) -> None:
    """Run the steps of one setting in this process and print one JSON line per step."""
    from evsam_cli.accel.allocator import tune_cpu_allocator, tune_cpu_allocator_for_training

    if args.setting in ("inference", "training"):
        tune_cpu_allocator()
    if args.setting == "training":
        tune_cpu_allocator_for_training()

    import torch

    torch.manual_seed(0)
    model, loss, opt, batch = training_run(args, frozen=False)
    for step in range(args.steps):
        batch["step"] = step  # odd steps: multimask output, as in training
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        train_step(model, loss, opt, batch)
        t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        row = {
            "setting": args.setting,
            "step": step,
            "wall_s": t1 - t0,
            "user_s": r1.ru_utime - r0.ru_utime,
            "sys_s": r1.ru_stime - r0.ru_stime,
            "minflt": r1.ru_minflt - r0.ru_minflt,
            "rss_mib": _rss_mib(),
            "maxrss_mib": r1.ru_maxrss / 1024,
        }
        print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_arguments(ap, steps=4, steps_help="steps per process; the first is left out")
    ap.add_argument("--rounds", type=int, default=1, help="processes per setting, interleaved")
    ap.add_argument(
        "--settings", default=",".join(SETTINGS), help="comma-separated, of " + ", ".join(SETTINGS)
    )
    ap.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)  # one child process
    args = ap.parse_args()
    if args.setting:
        _one(args)
        return
    settings = args.settings.split(",")
    rows: list[dict] = []
    for _ in range(args.rounds):
        for setting in settings:
            cmd = [sys.executable, __file__, "--setting", setting, "--model", args.model]
            cmd += [
                "--batch-size",
                str(args.batch_size),
                "--masks",
                str(args.masks),
                "--steps",
                str(args.steps),
            ]
            if args.image_size:
                cmd += ["--image-size", str(args.image_size)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            for line in out.splitlines():
                rows.append(json.loads(line))
                print(line, file=sys.stderr, flush=True)
    summary = {}
    for setting in settings:
        mine = [r for r in rows if r["setting"] == setting and r["step"] > 0]
        summary[setting] = {
            key: statistics.median(r[key] for r in mine) for key in ("wall_s", "user_s", "sys_s", "minflt")
        }
        summary[setting]["rss_mib_max"] = max(r["rss_mib"] for r in mine)
        summary[setting]["rss_mib_last"] = [r["rss_mib"] for r in mine][-1]
    print(json.dumps({"args": vars(args), "per_setting": summary}, indent=2))


if __name__ == "__main__":
    main()

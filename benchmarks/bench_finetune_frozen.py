"""One `finetune --freeze-encoder` step (warm cache: embeddings in, decoder trained) against one full
finetune step (encoder and decoder trained) on the same batch, interleaved, medians reported.

    python benchmarks/bench_finetune_frozen.py --model l0 --batch-size 2 --masks 16 --steps 5

Random weights and inputs: the cost of a step does not depend on them. Wall and CPU (user +
system) seconds are both reported, since on a shared machine the wall time moves with the load.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from evsam_cli.accel.allocator import tune_cpu_allocator_for_training
from evsam_cli.models import create_model
from evsam_cli.train.finetune import FinetuneLoss, PromptedSam


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="l0")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--masks", type=int, default=16, help="masks (prompts) per image")
    ap.add_argument("--steps", type=int, default=5, help="steps of each kind; the first is left out")
    args = ap.parse_args()
    tune_cpu_allocator_for_training()  # as the training commands do
    torch.manual_seed(0)
    b, k = args.batch_size, args.masks
    runs = {}
    for frozen in (True, False):
        sam = create_model(args.model, input_size=args.image_size)
        model = PromptedSam(sam, freeze_encoder=frozen).train()
        loss = FinetuneLoss(torch.device("cpu"), focal_weight=20, dice_weight=1, embed=lambda lk: lk["emb"])
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        s = sam.input_size
        batch = {
            "masks": torch.rand(b, k, s, s) > 0.5,
            "boxes": torch.tensor([[[10.0, 10.0, 500.0, 500.0]] * k] * b),
            "points": torch.rand(b, k, 3, 2) * 1000,
            "point_labels": torch.ones(b, k, 3),
            "use_box": torch.arange(b) % 2 == 0,
        }
        if frozen:
            batch["lookup"] = {
                "emb": torch.randn(b, 256, 64, 64),
                "hit_index": list(range(b)),
                "miss_index": [],
            }
        else:
            batch["image"] = torch.randint(0, 255, (b, 3, s, s), dtype=torch.uint8)
            batch["image_hw"] = torch.tensor([[s, s]] * b)
        runs["frozen" if frozen else "full"] = (model, loss, opt, batch)
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for step in range(args.steps):
        for name, (model, loss, opt, batch) in runs.items():
            batch["step"] = step  # odd steps: multimask output, as in training
            t, c = time.perf_counter(), _cpu()
            value, _ = loss(model, batch)
            value.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(_cpu() - c)
    out = {
        name: {"wall_s": statistics.median(wall[name][1:]), "cpu_s": statistics.median(cpu[name][1:])}
        for name in runs
    }
    out["speedup_wall"] = out["full"]["wall_s"] / out["frozen"]["wall_s"]
    out["speedup_cpu"] = out["full"]["cpu_s"] / out["frozen"]["cpu_s"]
    print(json.dumps({"args": vars(args), "threads": torch.get_num_threads(), **out}, indent=2))


if __name__ == "__main__":
    main()

"""One `finetune --freeze-encoder` step (warm cache: embeddings in, decoder trained) against one full
finetune step (encoder and decoder trained) on the same batch, interleaved, medians reported.

    python benchmarks/bench_finetune_frozen.py --model l0 --batch-size 2 --masks 16 --steps 5

Random weights and inputs: the cost of a step does not depend on them. Wall and CPU (user +
system) seconds are both reported, since on a shared machine the wall time moves with the load.
``speedup_bound`` is what the frozen step could reach if its backward and loss were free: (full
- frozen + decoder forward without autograd) / decoder forward without autograd.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch
from bench_train_step import add_step_arguments, train_step, training_run  # same folder

from evsam_cli.accel.allocator import tune_cpu_allocator_for_training


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_arguments(ap, steps=5, steps_help="steps of each kind; the first is left out")
    args = ap.parse_args()
    tune_cpu_allocator_for_training()  # as the training commands do
    torch.manual_seed(0)
    runs = {"frozen": training_run(args, frozen=True), "full": training_run(args, frozen=False)}
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for step in range(args.steps):
        for name, (model, loss, opt, batch) in runs.items():
            batch["step"] = step  # odd steps: multimask output, as in training
            t, c = time.perf_counter(), _cpu()
            train_step(model, loss, opt, batch)
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(_cpu() - c)
    out = {
        name: {"wall_s": statistics.median(wall[name][1:]), "cpu_s": statistics.median(cpu[name][1:])}
        for name in runs
    }
    out["speedup_wall"] = out["full"]["wall_s"] / out["frozen"]["wall_s"]
    out["speedup_cpu"] = out["full"]["cpu_s"] / out["frozen"]["cpu_s"]
    # The bound on that ratio at these settings: a frozen step costs at least the decoder's
    # forward in its fastest form (no autograd), and a full step that plus the encoder's part.
    model, _, _, batch = runs["frozen"]
    forward = []
    with torch.no_grad():
        for _ in range(3):
            t = time.perf_counter()
            model(
                batch["lookup"]["emb"],
                batch["boxes"],
                batch["points"],
                batch["point_labels"],
                batch["use_box"],
                True,
            )
            forward.append(time.perf_counter() - t)
    encoder_part = out["full"]["wall_s"] - out["frozen"]["wall_s"]
    out["decoder_forward_no_grad_s"] = statistics.median(forward)
    out["speedup_bound"] = (encoder_part + out["decoder_forward_no_grad_s"]) / out[
        "decoder_forward_no_grad_s"
    ]
    print(json.dumps({"args": vars(args), "threads": torch.get_num_threads(), **out}, indent=2))


if __name__ == "__main__":
    main()

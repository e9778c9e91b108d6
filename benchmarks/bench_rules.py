"""The measurements behind the CPU backend's fixed rules, re-measurable on any machine.

Three rules in ``evsam_cli/accel`` are thresholds chosen by measurement; this script measures
each of them against its alternative, interleaved in one process (medians of ``--repeats``
rounds), and prints the ratios:

* Winograd F(4x4, 3x3) (``accel/winograd.py``) against oneDNN's direct convolution with the same
  fused GELU, per layer shape of the EfficientViT-SAM encoders: the rule
  (``accel/encoder.py: winograd_pays``) takes Winograd from 128 input channels and 384 channels in
  and out together.
* Two-thread decoder passes (``accel/passes.py: map_passes``) against one pass after another,
  for 4 to 64 box prompts: the split starts at 16 prompts.
* Prompts per decoder pass on the CPU (``predictor/sam_predictor.py: default_prompts_per_pass``):
  8, 16 and 32 for 64 box prompts.

    python benchmarks/bench_rules.py                 # all three, writes benchmarks/results/rules.json
    python benchmarks/bench_rules.py --only winograd --repeats 9

Random weights (timings do not depend on the values). Not a test.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from bench_speed import interleaved as interleaved_stats
from torch import nn

from evsam_cli import tune_cpu_allocator


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each callable, rounds alternating between them (``bench_speed``)."""
    return {k: v["median_s"] for k, v in interleaved_stats(fns, repeats, warmup=2).items()}


# (in, out, pixels) of the dense stride-1 3x3 convolutions in L0 at 512 and XL1 at 1024
CONV_SHAPES = [
    (64, 64, 128),
    (64, 256, 128),
    (128, 128, 64),
    (128, 256, 64),
    (128, 512, 128),
    (256, 1024, 64),
]


@torch.inference_mode()
def bench_winograd(repeats: int) -> list[dict]:
    from evsam_cli.accel.encoder import FusedConvAct, winograd_pays
    from evsam_cli.accel.winograd import WinogradConv2d

    rows = []
    for cin, cout, px in CONV_SHAPES:
        conv = nn.Conv2d(cin, cout, 3, padding=1)
        x = torch.randn(1, cin, px, px).contiguous(memory_format=torch.channels_last)
        direct, wino = FusedConvAct(conv, nn.GELU()), WinogradConv2d(conv, nn.GELU())
        t = interleaved({"direct": lambda f=direct, x=x: f(x), "winograd": lambda f=wino, x=x: f(x)}, repeats)
        rows.append(
            {
                "in": cin,
                "out": cout,
                "pixels": f"{px}x{px}",
                "direct_ms": 1e3 * t["direct"],
                "winograd_ms": 1e3 * t["winograd"],
                "speedup": t["direct"] / t["winograd"],
                "rule_takes_winograd": winograd_pays(conv),
            }
        )
    return rows


def _predictor(max_prompts_per_pass: int | None = None):
    from evsam_cli.models import create_model
    from evsam_cli.predictor import SamPredictor

    torch.manual_seed(0)
    model = create_model("l0", input_size=512)
    predictor = SamPredictor(model, max_prompts_per_pass=max_prompts_per_pass)
    image = (np.random.default_rng(0).random((480, 640, 3)) * 255).astype(np.uint8)
    predictor.set_image(image)
    return predictor


def _boxes(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    xy = rng.random((n, 2)) * [560, 400]
    return np.concatenate([xy, xy + rng.random((n, 2)) * [80, 80] + 8], axis=1)


def bench_passes(repeats: int) -> list[dict]:
    from evsam_cli.accel import passes

    predictor = _predictor()
    rule = passes.MIN_PROMPTS_PER_THREAD

    def decode(boxes: np.ndarray, min_per_thread: int) -> None:
        passes.MIN_PROMPTS_PER_THREAD = min_per_thread  # read by map_passes at each call
        try:
            predictor.predict_batch(boxes=boxes)
        finally:
            passes.MIN_PROMPTS_PER_THREAD = rule

    rows = []
    for n in (4, 8, 16, 64):
        boxes = _boxes(n)
        t = interleaved(
            {
                "one_after_another": lambda b=boxes: decode(b, 10**9),  # never split
                "two_threads": lambda b=boxes: decode(b, 1),  # split even below the rule
            },
            repeats,
        )
        rows.append(
            {
                "prompts": n,
                "one_after_another_ms": 1e3 * t["one_after_another"],
                "two_threads_ms": 1e3 * t["two_threads"],
                "speedup": t["one_after_another"] / t["two_threads"],
                "rule_splits": n >= 2 * rule,
            }
        )
    return rows


def bench_pass_size(repeats: int, prompts: int = 64) -> list[dict]:
    boxes = _boxes(prompts)
    predictors = {k: _predictor(k) for k in (8, 16, 32)}
    t = interleaved(
        {str(k): (lambda p=p: p.predict_batch(boxes=boxes)) for k, p in predictors.items()}, repeats
    )
    return [
        {"prompts": prompts, "per_pass": int(k), "ms": 1e3 * v, "vs_16": t["16"] / v} for k, v in t.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=("winograd", "passes", "pass-size"), default=None)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "rules.json")
    args = parser.parse_args()
    tune_cpu_allocator()  # as the evsam command does

    from evsam_cli.utils.io import write_json_atomic

    results: dict[str, object] = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    if args.only in (None, "winograd"):
        results["winograd"] = rows = bench_winograd(args.repeats)
        print("Winograd F(4x4,3x3) vs direct (GELU fused), batch 1, channels-last")
        for r in rows:
            print(
                f"  {r['in']:4d} -> {r['out']:4d} at {r['pixels']:>7s}: direct {r['direct_ms']:7.1f} ms, "
                f"winograd {r['winograd_ms']:7.1f} ms, {r['speedup']:.2f}x (rule: "
                f"{'winograd' if r['rule_takes_winograd'] else 'direct'})"
            )
    if args.only in (None, "passes"):
        results["passes"] = rows = bench_passes(args.repeats)
        print("Decoder passes of N boxes (L0, 640x480): one after another vs two threads")
        for r in rows:
            print(
                f"  {r['prompts']:3d} prompts: {r['one_after_another_ms']:7.1f} vs {r['two_threads_ms']:7.1f} ms, "
                f"{r['speedup']:.2f}x (rule: {'split' if r['rule_splits'] else 'no split'})"
            )
    if args.only in (None, "pass-size"):
        results["pass_size"] = rows = bench_pass_size(args.repeats)
        print("Prompts per decoder pass, 64 boxes (L0, 640x480)")
        for r in rows:
            print(f"  {r['per_pass']:3d} per pass: {r['ms']:7.1f} ms ({r['vs_16']:.2f}x the time of 16)")
    write_json_atomic(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

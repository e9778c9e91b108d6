"""evsam vs the official EfficientViT-SAM implementation: encoder and decoder speed on one machine.

Same weights (the official model's random init, loaded into ours through the official key
layout), same inputs, same process; runs of the two implementations are interleaved so drifts in
machine load hit both. Reports medians, the spread (p10-p90) and the ratio, plus the encoder's
fraction of the MAC floor (counted MACs at this machine's measured fp32 matmul rate).

    python benchmarks/bench_speed.py                      # L0 + XL1, CPU, writes benchmarks/results/
    python benchmarks/bench_speed.py --models l0 --repeats 5 --prompts 64

Needs the dev extra (``efficientsam==1.0.0``, the official code packaged). Not a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from evsam_cli import tune_cpu_allocator


def _machine() -> dict:
    from evsam_cli.utils.devices import device_name

    return {
        "cpu": device_name(torch.device("cpu")),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def matmul_gflops(n: int = 1024, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def _stats(times: list[float]) -> dict:
    q = np.percentile(times, [10, 50, 90])
    return {"median_s": float(q[1]), "p10_s": float(q[0]), "p90_s": float(q[2]), "runs": len(times)}


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Time each callable ``repeats`` times, alternating between them after ``warmup`` calls each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: _stats(v) for k, v in times.items()}


def bench_model(name: str, *, repeats: int, prompts: int, ort: bool) -> dict:
    from efficientsam.models.efficientvit.sam import EfficientViTSamPredictor
    from efficientsam.sam_model_zoo import create_efficientvit_sam_model

    from evsam_cli.models import create_model
    from evsam_cli.models.profile import profile_model
    from evsam_cli.predictor.sam_predictor import SamPredictor

    torch.manual_seed(0)
    ref = create_efficientvit_sam_model(name, pretrained=False).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.pt"
        torch.save(ref.state_dict(), path)
        ours = create_model(name, checkpoint=path)
    size = ours.input_size
    x = torch.randn(1, 3, size, size)
    ref_pred, our_pred = EfficientViTSamPredictor(ref), SamPredictor(ours)

    # ---- encoder, batch 1
    def ref_encoder():
        with torch.inference_mode():
            ref.image_encoder(x)

    def our_encoder():
        with torch.inference_mode():
            our_pred.image_encoder(x)

    fns = {"official": ref_encoder, "evsam_torch": our_encoder}
    if ort:
        fns["evsam_onnxruntime"] = _ort_encoder(ours, size)
    enc = interleaved(fns, repeats)
    macs = profile_model(name).encoder_macs
    gflops = matmul_gflops()
    floor_s = 2 * macs / (gflops * 1e9)
    encoder = {
        k: {**v, "images_per_s": 1.0 / v["median_s"], "fraction_of_mac_floor": floor_s / v["median_s"]}
        for k, v in enc.items()
    }
    for k in encoder:
        encoder[k]["speedup_vs_official"] = enc["official"]["median_s"] / enc[k]["median_s"]

    # ---- decoder: N box prompts of one image, official one prompt per call (as its eval loop)
    rng = np.random.default_rng(0)
    image = (rng.random((480, 640, 3)) * 255).astype(np.uint8)
    ref_pred.set_image(image)
    our_pred.set_image(image)
    xy = rng.random((prompts, 2)) * [560, 400]
    boxes = np.concatenate([xy, xy + rng.random((prompts, 2)) * [80, 80] + 8], axis=1)

    def ref_decoder():
        for box in boxes:
            ref_pred.predict(box=box, multimask_output=True)

    def our_decoder():
        our_pred.predict_batch(boxes=boxes, multimask_output=True)

    dec = interleaved({"official": ref_decoder, "evsam_torch": our_decoder}, max(3, repeats // 2))
    decoder = {k: {**v, "prompts": prompts, "prompts_per_s": prompts / v["median_s"]} for k, v in dec.items()}
    for k in decoder:
        decoder[k]["speedup_vs_official"] = dec["official"]["median_s"] / dec[k]["median_s"]
    m_ref, s_ref, _ = ref_pred.predict(box=boxes[0], multimask_output=True)
    m_our, s_our, _ = our_pred.predict_batch(boxes=boxes[:1], multimask_output=True)
    agreement = float((m_ref == m_our[0]).mean())
    return {
        "model": name,
        "input_size": size,
        "encoder_macs": macs,
        "matmul_gflops": gflops,
        "mac_floor_s": floor_s,
        "encoder": encoder,
        "decoder": decoder,
        "mask_pixel_agreement": agreement,
        "max_score_diff": float(np.abs(s_ref - s_our[0]).max()),
    }


def bench_postprocess(repeats: int, masks: int = 24) -> dict:
    """Thresholded mask upscaling, 640x480 image, on low-res logits shaped like a trained
    decoder's (one smooth blob per mask): the official predictor's two ``F.interpolate`` +
    threshold against ``upscale_binary`` (``Sam.postprocess_binary``). At this size evsam takes
    the banded products, whose cost does not depend on the logits (the decoder benchmark's
    random weights give noise; the sign rule for larger images would fall back to them)."""
    import torch.nn.functional as F

    from evsam_cli.accel.upscale import upscale_binary

    original, frame = (480, 640), (768, 1024)
    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    centre = torch.rand(masks, 2, generator=gen) * torch.tensor([192.0, 256.0])
    radius = 4 + torch.rand(masks, generator=gen) * 40
    dist = ((yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2).sqrt()
    low = (8 * (1 - dist / radius[:, None, None]) + 0.3 * torch.randn(masks, 256, 256, generator=gen))[None]

    def official():
        up = F.interpolate(low, (1024, 1024), mode="bilinear", align_corners=False)[
            ..., : frame[0], : frame[1]
        ]
        return F.interpolate(up, original, mode="bilinear", align_corners=False) > 0

    def ours():
        return upscale_binary(low, frame, original, 1024)  # what Sam.postprocess_binary calls

    agreement = float((official() == ours()).float().mean())
    times = interleaved({"official": official, "evsam": ours}, repeats)
    return {
        "masks": masks,
        "image": list(original),
        **times,
        "speedup": times["official"]["median_s"] / times["evsam"]["median_s"],
        "pixel_agreement": agreement,
    }


def _ort_encoder(model, size: int):
    """An onnxruntime session of the exported encoder (None-safe: skipped if export is unavailable)."""
    import onnxruntime as ort

    from evsam_cli.export import export_onnx
    from evsam_cli.export.onnx import ONNXRUNTIME_OPSET

    tmp = Path(tempfile.mkdtemp())
    export_onnx(model, tmp, opset=ONNXRUNTIME_OPSET)
    sess = ort.InferenceSession(str(tmp / "encoder.onnx"), providers=["CPUExecutionProvider"])
    feed = {
        sess.get_inputs()[0].name: np.random.default_rng(0).standard_normal(
            (1, 3, size, size), dtype=np.float32
        )
    }
    return lambda: sess.run(None, feed)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["l0", "xl1"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--no-ort", action="store_true", help="skip the onnxruntime encoder")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "speed.json")
    args = parser.parse_args()
    # As the evsam command does at start; it applies to both implementations in this process.
    tune_cpu_allocator()

    from evsam_cli.models import resolve_name
    from evsam_cli.utils.io import write_json_atomic

    results = {"machine": _machine(), "runs": []}
    for m in args.models:
        name = resolve_name(m)
        r = bench_model(name, repeats=args.repeats, prompts=args.prompts, ort=not args.no_ort)
        results["runs"].append(r)
        print(f"\n{name} (input {r['input_size']}, {r['encoder_macs'] / 1e9:.1f} GMACs, "
              f"matmul {r['matmul_gflops']:.0f} GFLOP/s, MAC floor {r['mac_floor_s'] * 1e3:.0f} ms)")  # fmt: skip
        print(
            f"{'encoder b1':22s} {'median ms':>10s} {'p10-p90 ms':>14s} {'img/s':>7s} {'x official':>10s} {'floor %':>8s}"
        )
        for k, v in r["encoder"].items():
            print(
                f"{k:22s} {v['median_s'] * 1e3:10.0f} {v['p10_s'] * 1e3:6.0f}-{v['p90_s'] * 1e3:<7.0f} "
                f"{v['images_per_s']:7.2f} {v['speedup_vs_official']:10.2f} {100 * v['fraction_of_mac_floor']:7.0f}%"
            )
        print(
            f"{'decoder ' + str(args.prompts) + ' boxes':22s} {'median s':>10s} {'p10-p90 s':>14s} {'prm/s':>7s} {'x official':>10s}"
        )
        for k, v in r["decoder"].items():
            print(
                f"{k:22s} {v['median_s']:10.2f} {v['p10_s']:6.2f}-{v['p90_s']:<7.2f} "
                f"{v['prompts_per_s']:7.1f} {v['speedup_vs_official']:10.2f}"
            )
        print(f"mask agreement with official: {100 * r['mask_pixel_agreement']:.4f}% of pixels")
    post = bench_postprocess(args.repeats)
    results["postprocess"] = post
    print(
        f"\nthresholded upscaling of {post['masks']} smooth masks to 640x480: official "
        f"{post['official']['median_s'] * 1e3:.1f} ms, evsam {post['evsam']['median_s'] * 1e3:.1f} ms "
        f"({post['speedup']:.2f}x), agreement {100 * post['pixel_agreement']:.4f}%"
    )
    write_json_atomic(args.out, results)
    print(f"\nwritten {args.out}")
    print(json.dumps(results["machine"]))


if __name__ == "__main__":
    main()

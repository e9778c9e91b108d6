"""TensorRT: profile shapes, binding plans and fp32 layer marking (always); engines (GPU + TensorRT only)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from evsam_cli.export import ExportError
from evsam_cli.export.onnx import FP32_TAG
from evsam_cli.export.tensorrt import (
    TensorSpec,
    decoder_profile,
    encoder_profile,
    mark_fp32_layers,
    plan_bindings,
)


# ---------------------------------------------------------------------------- profiles
def test_encoder_profile():
    prof = encoder_profile(input_size=512, max_batch=16)
    assert prof == {"images": ((1, 3, 512, 512), (16, 3, 512, 512), (16, 3, 512, 512))}
    assert encoder_profile(input_size=1024, max_batch=8, opt_batch=1)["images"][1] == (1, 3, 1024, 1024)
    with pytest.raises(ExportError, match="at least 1"):
        encoder_profile(input_size=512, max_batch=0)
    with pytest.raises(ExportError, match="outside"):
        encoder_profile(input_size=512, max_batch=4, opt_batch=8)


def test_decoder_profile_covers_boxes_and_clicks():
    prof = decoder_profile(max_prompts=64, max_points=12)
    assert set(prof) == {"image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input"}
    assert prof["image_embeddings"] == ((1, 256, 64, 64),) * 3  # one image, never tiled per prompt
    assert prof["point_coords"] == ((1, 1, 2), (16, 2, 2), (64, 12, 2))  # opt: 16 boxes
    assert prof["point_labels"] == ((1, 1), (16, 2), (64, 12))
    assert prof["mask_input"] == ((1, 1, 256, 256), (1, 1, 256, 256), (64, 1, 256, 256))
    assert prof["has_mask_input"] == ((1,), (1,), (64,))
    tied = decoder_profile(max_prompts=8, opt_prompts=8, mask_batch="prompts")
    assert tied["mask_input"][1] == (8, 1, 256, 256) and tied["point_coords"][1] == (8, 2, 2)
    for name, (lo, opt, hi) in prof.items():  # min <= opt <= max on every axis
        assert all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)), name
    with pytest.raises(ExportError):
        decoder_profile(max_prompts=0)


# ---------------------------------------------------------------------------- binding plans
SPECS = [
    TensorSpec("image_embeddings", True, "FLOAT", (1, 256, 64, 64), ((1, 256, 64, 64),) * 3),
    TensorSpec("point_coords", True, "FLOAT", (-1, -1, 2), ((1, 1, 2), (16, 2, 2), (64, 16, 2))),
    TensorSpec("point_labels", True, "FLOAT", (-1, -1), ((1, 1), (16, 2), (64, 16))),
    TensorSpec("low_res_masks", False, "FLOAT", (-1, 4, 256, 256)),
    TensorSpec("iou_predictions", False, "FLOAT", (-1, 4)),
]
GOOD = {"image_embeddings": (1, 256, 64, 64), "point_coords": (10, 3, 2), "point_labels": (10, 3)}


def test_plan_bindings_ok():
    plan = plan_bindings(SPECS, GOOD)
    assert [name for name, _, _ in plan.inputs] == ["image_embeddings", "point_coords", "point_labels"]
    assert plan.inputs[1] == ("point_coords", (10, 3, 2), "FLOAT")
    assert plan.outputs == (("low_res_masks", "FLOAT"), ("iou_predictions", "FLOAT"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"point_labels": None}, "missing"),
        ({"extra": (1,)}, "unexpected"),
        ({"point_labels": (10,)}, "rank"),
        ({"image_embeddings": (2, 256, 64, 64)}, "fixes it at 1"),
        ({"point_coords": (65, 3, 2), "point_labels": (65, 3)}, "outside the engine's profile 1..64"),
        ({"point_coords": (4, 17, 2), "point_labels": (4, 17)}, "--max-points"),
    ],
)
def test_plan_bindings_rejects(change, message):
    shapes = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    with pytest.raises(ExportError, match=message):
        plan_bindings(SPECS, shapes, engine="decoder.engine")


# ---------------------------------------------------------------------------- fp32 constraints
class FakeLayer:
    def __init__(self, name, kind, dtypes):
        self.name, self.type = name, kind
        self._outs = [SimpleNamespace(dtype=d) for d in dtypes]
        self.num_outputs = len(dtypes)
        self.precision = None
        self.output_types = {}

    def get_output(self, j):
        return self._outs[j]

    def set_output_type(self, j, dtype):
        self.output_types[j] = dtype


def test_mark_fp32_layers_only_tagged_float_compute():
    trt = SimpleNamespace(
        float32="f32", int64="i64", LayerType=SimpleNamespace(SHAPE="shape", CONSTANT="const")
    )
    layers = [
        FakeLayer(f"{FP32_TAG}/image_encoder/norm/ReduceMean", "reduce", ["f32"]),
        FakeLayer(
            f"{FP32_TAG}/image_encoder/backbone/stages.4/op_list.1/context_module/main/Shape",
            "shape",
            ["i64"],
        ),
        FakeLayer(f"{FP32_TAG}/image_encoder/norm/Constant", "const", ["f32"]),
        FakeLayer("/image_encoder/backbone/stages.0/op_list.0/conv/Conv", "conv", ["f32"]),
        FakeLayer(f"{FP32_TAG}/transformer/layers.0/norm1/LayerNormalization_1", "norm", ["f32"]),
    ]
    network = SimpleNamespace(num_layers=len(layers), get_layer=lambda i: layers[i])
    assert mark_fp32_layers(network, trt) == 2
    assert [layer.precision for layer in layers] == ["f32", None, None, None, "f32"]
    assert layers[0].output_types == {0: "f32"} and layers[3].output_types == {}


# ---------------------------------------------------------------------------- real engines
@pytest.fixture(scope="module")
def trt_export(tmp_path_factory):
    import torch

    from evsam_cli.export import export_model

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("trt")
    record = export_model(
        model="l0", input_size=256, output_dir=out, fmt="trt", precision="fp16", max_batch=4, max_prompts=32
    )
    return out, record


@pytest.mark.gpu
@pytest.mark.trt
def test_trt_export_record_and_files(trt_export):
    out, record = trt_export
    assert (out / "encoder.engine").stat().st_size > 0 and (out / "decoder.engine").stat().st_size > 0
    saved = json.loads((out / "export.json").read_text())
    assert saved["ok"] and saved["format"] == "trt" and saved["precision"] == "fp16"
    assert saved["tensorrt"]["fp32_layers"]["encoder"] > 0
    assert saved["parity"]["tensorrt"]["image"]["logits"] < 0.5


@pytest.mark.gpu
@pytest.mark.trt
def test_trt_predictor_matches_onnx_predictor(trt_export):
    from evsam_cli.export import OnnxSamPredictor, TrtSamPredictor
    from evsam_cli.export.parity import synthetic_image

    out, _ = trt_export
    image = synthetic_image(240, 320)
    onnx_pred = OnnxSamPredictor(out / "encoder.onnx", out / "decoder.onnx")
    trt_pred = TrtSamPredictor(out / "encoder.engine", out / "decoder.engine")
    onnx_pred.set_image(image)
    trt_pred.set_image(image)
    boxes = np.array([[10, 10, 150, 120], [100, 50, 300, 230], [0, 0, 320, 240]])
    _, s1, l1 = onnx_pred.predict_batch(boxes=boxes)
    _, s2, l2 = trt_pred.predict_batch(boxes=boxes)
    assert l2.shape == l1.shape and s2.shape == s1.shape
    assert np.abs(l2 - l1).max() < 0.5 and np.abs(s2 - s1).max() < 0.05  # fp16 engines
    many = np.tile(boxes, (15, 1))  # 45 prompts > max_prompts 32: chunked by the profile
    assert trt_pred.predict_batch(boxes=many)[1].shape == (45, 3)


@pytest.mark.gpu
@pytest.mark.trt
def test_trt_bench_json(trt_export):
    from evsam_cli.throughput import run_bench

    out, _ = trt_export
    rec, _ = run_bench(
        model="l0",
        engine="trt",
        device="cuda",
        input_size=256,
        exported=out,
        batch_size=4,
        prompts=8,
        iters=3,
    )
    assert rec["engine"] == "trt" and rec["device"] == "cuda" and rec["dtype"] == "fp16"
    assert rec["encoder"]["images_per_s"] > 0 and rec["decoder"]["prompts_per_s"] > 0

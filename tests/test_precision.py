"""Reduced precision: bf16 copies (accel/precision.py), int8 quantization (export/quantize.py) and
the agreement report (export/agreement.py), on L0 at a 64 input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from evsam_cli.accel import precision
from evsam_cli.accel.encoder import FusedConvAct
from evsam_cli.accel.precision import PrecisionError, check_dtype, reduced_model
from evsam_cli.errors import DataError, EvsamError
from evsam_cli.export.agreement import agreement_images, mask_iou, measure_agreement
from evsam_cli.export.errors import ExportError
from evsam_cli.export.quantize import calibration_images
from evsam_cli.predictor.sam_predictor import SamPredictor

needs_bf16 = pytest.mark.skipif(
    not precision.cpu_bf16_flags(), reason="this CPU has no bf16 instructions (avx512_bf16 / amx_bf16)"
)


@pytest.fixture(scope="module")
def tiny_model():
    from evsam_cli.models import create_model

    torch.manual_seed(0)
    return create_model("efficientvit-sam-l0", input_size=64)


def _few_images():
    """One held-out image with three boxes (the default set is four images of about eight)."""
    item, boxes = agreement_images(count=1)[0]
    return [(item, boxes[:3])]


@pytest.fixture(scope="module")
def held_out():
    return _few_images()


def test_check_dtype_errors(monkeypatch):
    assert check_dtype("fp32", "cpu") is torch.float32
    with pytest.raises(PrecisionError, match="unknown dtype 'int4'"):
        check_dtype("int4", "cpu")
    with pytest.raises(PrecisionError, match="fp16 needs a GPU"):
        check_dtype("fp16", "cpu")
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ())
    with pytest.raises(PrecisionError, match="bf16 instructions") as info:
        check_dtype("bf16", "cpu")
    assert isinstance(info.value, EvsamError)


@needs_bf16
def test_bf16_predictor_end_to_end(tiny_model, held_out):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    low = reduced_model(tiny_model, "bf16")
    encoder = low.image_encoder.module
    assert any(p.dtype == torch.bfloat16 for p in encoder.parameters())
    assert any(isinstance(m, FusedConvAct) for m in encoder.modules())
    norms = [m for m in encoder.modules() if isinstance(m, precision.Float32Norm)]
    assert norms and all(p.dtype == torch.float32 for n in norms for p in n.parameters())
    # The model itself is untouched (float32, same values, same modules).
    assert all(
        v.dtype == before[k].dtype and torch.equal(v, before[k]) for k, v in tiny_model.state_dict().items()
    )
    assert all(p.dtype == torch.float32 for p in low.prompt_encoder.parameters())  # coordinates stay float32

    image, boxes = held_out[0]
    pred = SamPredictor(low)
    pred.set_image(image.image)
    assert pred.get_image_embedding().dtype == torch.float32
    masks, scores, logits = pred.predict_batch(boxes=boxes, multimask_output=True)
    assert masks.shape == (len(boxes), 3, *image.image.shape[:2]) and masks.dtype == bool
    assert scores.dtype == np.float32 and logits.dtype == np.float32

    report = measure_agreement(SamPredictor(tiny_model), pred, held_out)
    assert report["embedding_rel_l2"]["max"] < 0.03
    assert report["mask_iou"]["mean"] > 0.9


def test_mask_iou_counts_empty_pairs_as_agreeing():
    a = np.zeros((3, 4, 4), dtype=bool)
    b = a.copy()
    a[1, :2] = True
    b[1, :1] = True
    a[2] = True
    np.testing.assert_allclose(mask_iou(a, b), [1.0, 0.5, 0.0])


def test_calibration_folder(tmp_path):
    with pytest.raises(DataError, match="not found"):
        calibration_images(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="no images"):
        calibration_images(tmp_path)
    for i in range(2):
        Image.fromarray(np.full((40, 60, 3), 60 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    assert [c.name for c in calibration_images(tmp_path)] == ["0.png", "1.png"]
    assert len(calibration_images(None)) == 8


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory):
    from evsam_cli.data.synthetic import synth_image
    from evsam_cli.export.pipeline import export_model

    calib = tmp_path_factory.mktemp("calib")
    rng = np.random.default_rng(5)
    for i in range(3):
        Image.fromarray(synth_image(rng, 96, 128, 4)[0]).save(calib / f"{i}.jpg")
    out = tmp_path_factory.mktemp("int8")
    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as patch:  # the export's agreement on the small set too
        patch.setattr("evsam_cli.export.agreement.agreement_images", _few_images)
        record = export_model(
            model="l0", output_dir=out, input_size=64, dtype="int8", calibration=calib, check=False
        )
    return out, record


def test_int8_export_records_quantization_and_agreement(int8_export):
    out, record = int8_export
    assert record == json.loads((out / "export.json").read_text())
    assert record["encoder_dtype"] == "int8" and record["ok"]
    quant = record["quantization"]
    assert quant["calibration_images"] == ["0.jpg", "1.jpg", "2.jpg"]
    assert quant["per_channel"] and quant["nodes_kept_float"] > 0 and quant["quantize_linear"] > 0
    assert quant["gelu_lookups"] > 0 and quant["sensitive_tensors"] >= 0  # uint8 GELUs in the graph
    agreement = record["agreement"]
    assert set(agreement) == {"reference", "images", "boxes", "embedding_rel_l2", "mask_iou"}
    assert agreement["boxes"] == 3 and agreement["images"] == ["synthetic-holdout-0"]
    assert 0 < agreement["embedding_rel_l2"]["mean"] < 0.1  # a real comparison: not zero, not wild
    assert agreement["mask_iou"]["mean"] > 0.8
    assert agreement["mask_iou"]["min"] <= agreement["mask_iou"]["mean"]


def test_corrupted_int8_encoder_shows_bad_agreement(int8_export, tiny_model, held_out, tmp_path):
    import onnx
    from onnx import numpy_helper

    from evsam_cli.export.runtime import OnnxSamPredictor

    out, _ = int8_export
    proto = onnx.load(str(out / "encoder.onnx"))
    rng = np.random.default_rng(0)
    corrupted = 0
    for init in proto.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype == np.int8 and w.size > 1000:  # the quantized conv weights
            init.CopyFrom(
                numpy_helper.from_array(rng.integers(-127, 128, w.shape).astype(np.int8), init.name)
            )
            corrupted += 1
    assert corrupted
    onnx.save(proto, str(tmp_path / "encoder.onnx"))
    torch.manual_seed(0)  # the export's weights: same seed, same model
    from evsam_cli.models import create_model

    net = create_model("l0", input_size=64)
    good = measure_agreement(
        SamPredictor(net), OnnxSamPredictor(out / "encoder.onnx", out / "decoder.onnx"), held_out
    )
    bad = measure_agreement(
        SamPredictor(net), OnnxSamPredictor(tmp_path / "encoder.onnx", out / "decoder.onnx"), held_out
    )
    assert bad["embedding_rel_l2"]["mean"] > 0.5 > good["embedding_rel_l2"]["mean"]
    assert bad["mask_iou"]["mean"] < good["mask_iou"]["mean"] - 0.2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dtype": "int8", "fmt": "trt"}, "use --format onnx"),
        ({"dtype": "int4"}, "unknown dtype"),
        ({"calibration": "somewhere"}, "--dtype int8 only"),
    ],
)
def test_export_dtype_errors(tmp_path, kwargs, message):
    from evsam_cli.export.pipeline import export_model

    with pytest.raises(ExportError, match=message):
        export_model(model="l0", output_dir=tmp_path, input_size=64, **kwargs)


# ---------------------------------------------------------------------------- the dtype setting
def _one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bench", "--engine", "torch", "--dtype", "int8", "--device", "cpu"], "use --engine onnxruntime"),
        (["bench", "--engine", "onnxruntime", "--dtype", "bf16", "--device", "cpu"], "fp32 or int8"),
        (["bench", "--engine", "torch", "--dtype", "fp16", "--device", "cpu"], "fp16 on the CPU"),
        (["export", "--model", "l0", "--format", "trt", "--dtype", "int8", "-o", "{tmp}"], "--format onnx"),
        (["export", "--model", "l0", "--calibration", "{tmp}", "-o", "{tmp}"], "--dtype int8 only"),
        (["predict", "{image}", "--box", "1,1,20,20", "--dtype", "fp16", "-o", "{tmp}"], "fp16 needs a GPU"),
    ],
)
def test_cli_unsupported_combinations(tmp_path, args, message):
    from typer.testing import CliRunner

    from evsam_cli.cli.app import app

    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    args = [a.format(tmp=tmp_path / "out", image=image) for a in args]
    assert message in _one_error_line(CliRunner().invoke(app, args))


def test_cli_bf16_without_instructions_is_one_error_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from evsam_cli.cli.app import app

    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ())
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    result = CliRunner().invoke(
        app, ["predict", str(image), "--box", "1,1,20,20", "--dtype", "bf16", "-o", str(tmp_path)]
    )
    assert "bf16 instructions" in _one_error_line(result)


@needs_bf16
def test_bf16_through_predictor_backends_and_bench(tiny_model, held_out):
    from evsam_cli.accel.backend import CpuBackend, ReferenceBackend
    from evsam_cli.throughput.engines import make_engine

    reference = SamPredictor(tiny_model)
    item, boxes = held_out[0]
    for backend in ("cpu", "reference"):
        pred = SamPredictor(tiny_model, dtype="bf16", backend=backend)
        assert isinstance(pred.backend, CpuBackend if backend == "cpu" else ReferenceBackend)
        assert next(pred.backend.mask_decoder.parameters()).dtype == torch.bfloat16
        pred.set_image(item.image)
        best = pred.predict_best(boxes=boxes)
        assert best.shape == (len(boxes), *item.image.shape[:2]) and best.dtype == torch.bool
    report = measure_agreement(reference, pred, held_out)  # the reference backend's
    assert 0 < report["embedding_rel_l2"]["max"] < 0.03 and report["mask_iou"]["mean"] > 0.9
    # `evsam bench --engine torch --dtype bf16` runs the predictor's backend (no autocast)
    engine = make_engine(
        "torch",
        model=tiny_model,
        checkpoint=None,
        device=torch.device("cpu"),
        dtype="bf16",
        batch_size=1,
        prompts=2,
    )
    assert engine.backend.dtype == "bf16" and engine.autocast_dtype is None
    low_res, iou = engine.decode(engine.encode())
    assert low_res.dtype == iou.dtype == torch.float32 and low_res.shape == (2, 3, 256, 256)


@needs_bf16
def test_automatic_masks_in_bf16(tiny_model, held_out):
    from evsam_cli.predictor.automatic import AutomaticMaskGenerator

    generator = AutomaticMaskGenerator(
        tiny_model, dtype="bf16", points_per_side=4, pred_iou_thresh=0, stability_score_thresh=0
    )
    assert generator.predictor.dtype == "bf16"
    masks = generator.generate(held_out[0][0].image)
    assert masks and all(m["segmentation"].dtype == bool for m in masks)

"""ONNX export: graphs, dynamic axes, parity with PyTorch, OnnxSamPredictor vs SamPredictor, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from evsam_cli.cli.app import app
from evsam_cli.data.frames import preprocess_shape
from evsam_cli.export import ExportError, OnnxSamPredictor, bilinear_matrix, postprocess_matrices
from evsam_cli.export.onnx import FP32_TAG, export_onnx, tag_fp32_nodes
from evsam_cli.export.parity import ParityRecorder, Tolerance, synthetic_image
from evsam_cli.export.runtime import postprocess_bands, upscale_masks
from evsam_cli.models import create_model
from evsam_cli.predictor.sam_predictor import SamPredictor

runner = CliRunner()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(1)
    model = create_model("l0", input_size=256)
    out = tmp_path_factory.mktemp("onnx")
    return model, export_onnx(model, out)


@pytest.fixture(scope="module")
def predictors(exported):
    model, export = exported
    image = synthetic_image(300, 420, seed=3)
    ref = SamPredictor(model)
    ours = OnnxSamPredictor(export.encoder_path, export.decoder_path)
    ref.set_image(image)
    ours.set_image(image)
    return ref, ours, image


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


# ---------------------------------------------------------------------------- graphs
def test_graphs_pass_checker_with_dynamic_axes(exported):
    _, export = exported
    assert export.opset == 17 and export.exporter == "torchscript"
    enc = onnx.load(str(export.encoder_path))
    dec = onnx.load(str(export.decoder_path))
    onnx.checker.check_model(enc, full_check=True)
    onnx.checker.check_model(dec, full_check=True)
    assert enc.opset_import[0].version == 17

    def dims(graph_input):
        return [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim]

    inputs = {i.name: dims(i) for i in dec.graph.input}
    assert inputs["image_embeddings"] == [1, 256, 64, 64]  # one image, broadcast inside the graph
    assert inputs["point_coords"] == ["num_prompts", "num_points", 2]
    assert inputs["point_labels"] == ["num_prompts", "num_points"]
    assert inputs["mask_input"][0] == "mask_batch"
    assert dims(enc.graph.input[0]) == ["batch", 3, 256, 256]
    ops = {n.op_type for n in dec.graph.node} | {n.op_type for n in enc.graph.node}
    assert not ops & {"Tile", "OneHot", "NonZero", "Loop", "If"}  # ops that trouble TensorRT builds
    meta = {p.key: json.loads(p.value) for p in enc.metadata_props}
    assert meta["evsam.input_size"] == 256 and meta["evsam.prompt_size"] == 1024


def test_normalisation_nodes_tagged_fp32(exported):
    _, export = exported
    enc = onnx.load(str(export.encoder_path))
    tagged = [n for n in enc.graph.node if n.name.startswith(FP32_TAG)]
    kinds = {n.op_type for n in tagged}
    assert {"MatMul", "Div"} <= kinds  # LiteMLA attention
    assert kinds & {"ReduceMean", "LayerNormalization"}  # LayerNorm2d (either way it is written)
    assert "Conv" not in kinds  # the convolutions stay free to run in fp16
    dec = onnx.load(str(export.decoder_path))
    norms = [n for n in dec.graph.node if n.op_type == "LayerNormalization"]
    assert norms and all(n.name.startswith(FP32_TAG) for n in norms)
    assert export.fp32_nodes["encoder"] == len(tagged)


def test_tagging_reads_dynamo_scopes():
    """The dynamo exporter records module scopes as metadata instead of node names."""
    model = create_model("l0", input_size=64).image_encoder

    def node(name, op, scopes):
        n = onnx.helper.make_node(op, ["x"], ["y"], name=name)
        prop = n.metadata_props.add()
        prop.key, prop.value = "pkg.torch.onnx.name_scopes", repr(scopes)
        return n

    graph = onnx.helper.make_graph(
        [
            node("a", "ReduceMean", ["", "norm", "mean"]),
            node(
                "b", "Conv", ["", "backbone", "backbone.stages.4.op_list.1.context_module.main.qkv", "conv"]
            ),
            node(
                "c", "MatMul", ["", "backbone", "backbone.stages.4.op_list.1.context_module.main", "matmul"]
            ),
            node("d", "Relu", ["", "backbone.stages.4.op_list.1.context_module.main.kernel_func", "relu"]),
        ],
        "g",
        [],
        [],
    )
    proto = onnx.helper.make_model(graph)
    assert tag_fp32_nodes(proto, model, "dynamo") == 3
    assert [n.name.startswith(FP32_TAG) for n in proto.graph.node] == [True, False, True, True]


# ---------------------------------------------------------------------------- numpy postprocessing
@pytest.mark.parametrize(("out_size", "in_size"), [(1024, 256), (37, 256), (300, 211), (5, 5)])
def test_bilinear_matrix_matches_interpolate(out_size, in_size):
    x = torch.randn(1, 1, in_size, 3, dtype=torch.float64)
    ref = F.interpolate(x, (out_size, 3), mode="bilinear", align_corners=False)[0, 0].numpy()
    ours = bilinear_matrix(out_size, in_size) @ x[0, 0].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-10)


def test_postprocess_matrices_match_sam(exported):
    model, _ = exported
    low = torch.randn(2, 3, 256, 256) * 5
    input_size, original = model.prompt_frame_size((333, 500)), (333, 500)
    ref = model.postprocess_masks(low, input_size, original).numpy()
    ay, ax = postprocess_matrices(input_size, original)
    ours = np.matmul(np.matmul(ay, low.numpy()), ax.T)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=1e-4)  # float32 rounding of a 25-wide range


@pytest.mark.parametrize("original", [(333, 500), (480, 640), (1500, 2000), (37, 29)])
def test_banded_upscaling_equals_the_matrices(original):
    """``upscale_masks`` (blocks of both matrices) = ``Ay @ low @ Ax.T`` in float64, as logits
    and thresholded."""
    low = np.random.default_rng(0).standard_normal((2, 3, 256, 256)).astype(np.float32) * 5
    input_size = preprocess_shape(*original, 1024)
    ay, ax = (m.astype(np.float64) for m in postprocess_matrices(input_size, original))
    exact = np.matmul(np.matmul(ay, low.astype(np.float64)), ax.T)
    bands = postprocess_bands(input_size, original)
    logits = upscale_masks(low, bands)
    assert logits.shape == exact.shape == (2, 3, *original) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, exact, atol=2e-5 * np.abs(exact).max())
    masks = upscale_masks(low, bands, threshold=0.5)
    assert masks.dtype == bool
    assert not ((masks != (exact > 0.5)) & (np.abs(exact - 0.5) > 1e-4)).any()


# ---------------------------------------------------------------------------- predictor parity
def _compare(ref, ours, **kwargs):
    r_masks, r_scores, r_low = ref.predict_batch(**kwargs, return_logits=True)
    o_masks, o_scores, o_low = ours.predict_batch(**kwargs, return_logits=True)
    assert o_masks.shape == r_masks.shape and o_scores.shape == r_scores.shape and o_low.shape == r_low.shape
    np.testing.assert_allclose(o_low, r_low, atol=1e-3)
    np.testing.assert_allclose(o_scores, r_scores, atol=1e-4)
    np.testing.assert_allclose(o_masks, r_masks, atol=2e-3)


def test_embedding_matches(predictors):
    ref, ours, _ = predictors
    np.testing.assert_allclose(ours.get_image_embedding(), ref.get_image_embedding().numpy(), atol=1e-4)
    assert ours.original_size == ref.original_size and ours.input_size == ref.input_size


@pytest.mark.parametrize("multimask", [True, False])
def test_boxes_one_and_several(predictors, multimask):
    ref, ours, image = predictors
    h, w = image.shape[:2]
    boxes = np.array([[10, 20, 0.6 * w, 0.7 * h], [0.3 * w, 0.2 * h, w - 5, h - 8], [0, 0, w, h]])
    _compare(ref, ours, boxes=boxes[:1], multimask_output=multimask)
    _compare(ref, ours, boxes=boxes, multimask_output=multimask)


def test_points_one_and_several(predictors):
    ref, ours, image = predictors
    h, w = image.shape[:2]
    rng = np.random.default_rng(0)
    one = np.array([[[0.4 * w, 0.5 * h]]])
    _compare(ref, ours, point_coords=one, point_labels=np.array([[1]]))
    several = rng.uniform(0, 1, size=(4, 3, 2)) * [w, h]
    labels = np.array([[1, 0, 1], [1, 1, -1], [0, 1, 1], [1, -1, -1]])
    _compare(ref, ours, point_coords=several, point_labels=labels, multimask_output=False)
    _compare(
        ref, ours, point_coords=several[:2], point_labels=labels[:2], boxes=np.array([[5, 5, 200, 150]] * 2)
    )


def test_single_predict_and_mask_input(predictors):
    ref, ours, _ = predictors
    box = np.array([30, 40, 250, 220])
    r = ref.predict(box=box)
    o = ours.predict(box=box)
    np.testing.assert_allclose(o[2], r[2], atol=1e-3)
    # thresholded masks: only pixels whose logit is ~0 may differ
    assert o[0].dtype == bool and o[0].shape == r[0].shape and (o[0] != r[0]).mean() < 1e-4
    best = int(np.argmax(r[1]))
    mask_in = r[2][best : best + 1]
    r2 = ref.predict(box=box, mask_input=mask_in, multimask_output=False)
    o2 = ours.predict(box=box, mask_input=mask_in, multimask_output=False)
    np.testing.assert_allclose(o2[2], r2[2], atol=1e-3)
    assert not np.allclose(r2[2], r[2][:1])  # the mask input changes the result


def test_predictor_chunks_prompts(exported, predictors):
    _, export = exported
    ref, ours, image = predictors
    chunked = OnnxSamPredictor(export.encoder_path, export.decoder_path, max_prompts_per_pass=2)
    chunked.set_embedding(ours.get_image_embedding(), image.shape[:2])
    boxes = np.array(
        [[10, 10, 100, 100], [50, 60, 200, 210], [0, 0, 300, 280], [120, 30, 400, 290], [5, 5, 40, 40]]
    )
    a = chunked.predict_batch(boxes=boxes)[2]
    b = ours.predict_batch(boxes=boxes)[2]
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_predictor_errors(exported, predictors, tmp_path):
    _, export = exported
    _, ours, _ = predictors
    with pytest.raises(ValueError, match="boxes must be"):
        ours.predict_batch(boxes=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="point_labels"):
        ours.predict(point_coords=np.zeros((1, 2)))
    fresh = OnnxSamPredictor(export.encoder_path, export.decoder_path)
    with pytest.raises(RuntimeError, match="set_image"):
        fresh.predict(box=np.array([0, 0, 5, 5]))
    from evsam_cli.errors import DataError

    with pytest.raises(DataError, match="not found"):
        OnnxSamPredictor(tmp_path / "nope.onnx", export.decoder_path)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a graph")
    with pytest.raises(ExportError, match="cannot load"):
        OnnxSamPredictor(bad, export.decoder_path)


def test_predictor_runs_without_torch(exported):
    """Exported models are usable without PyTorch: block its import in a fresh interpreter."""
    _, export = exported
    code = f"""
import sys
sys.modules["torch"] = None
import numpy as np
from evsam_cli.export import OnnxSamPredictor
p = OnnxSamPredictor({str(export.encoder_path)!r}, {str(export.decoder_path)!r})
p.set_image(np.full((90, 120, 3), 128, np.uint8))
masks, scores, low = p.predict(box=np.array([10, 10, 60, 50]))
assert masks.shape == (3, 90, 120) and scores.shape == (3,) and low.shape == (3, 256, 256)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


# ---------------------------------------------------------------------------- parity
def test_parity_recorder_enforces_tolerance():
    rec = ParityRecorder(Tolerance(atol=1e-3, rtol=1e-2))
    ref = np.array([[10.0, -20.0]])
    assert rec.check("random", "logits", ref + 0.05, ref) == pytest.approx(0.05)  # 0.05 <= 1e-3 + 0.2
    rec.raise_on_failure("graph")  # nothing beyond tolerance
    rec.check("image", "logits", ref + 0.5, ref)  # 0.5 > 0.201
    rec.check("image", "iou", np.array([np.nan]), np.array([0.5]))  # NaN never passes
    rec.check("image", "embeddings", np.zeros(3), np.zeros(4))
    with pytest.raises(ExportError, match="does not match PyTorch") as info:
        rec.raise_on_failure("graph")
    message = str(info.value)
    assert "image logits: max abs diff 0.5" in message and "image iou" in message and "shape" in message
    assert info.value.parity["random"]["logits"] == pytest.approx(0.05)  # measured values travel along


def test_large_graphs_keep_weights_in_a_side_file(tmp_path, monkeypatch):
    """Above protobuf's 2 GB (SAM ViT-H) weights go to NAME.onnx.data; forced here with a 1 MB limit."""
    import evsam_cli.export.onnx as onnx_export
    from evsam_cli.export import export_model

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 1_000_000)
    record = export_model(model="l0", input_size=64, output_dir=tmp_path, check=False)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["decoder.onnx", "decoder.onnx.data", "encoder.onnx", "encoder.onnx.data", "export.json"]
    assert record["files"]["encoder_weights"] == "encoder.onnx.data"
    assert (
        (tmp_path / "encoder.onnx").stat().st_size
        < 1_000_000
        < (tmp_path / "encoder.onnx.data").stat().st_size
    )
    onnx.checker.check_model(str(tmp_path / "encoder.onnx"), full_check=True)
    p = OnnxSamPredictor(tmp_path / "encoder.onnx", tmp_path / "decoder.onnx")
    p.set_image(np.full((40, 50, 3), 90, np.uint8))
    assert p.predict(box=np.array([2, 2, 30, 30]))[1].shape == (3,)


# ---------------------------------------------------------------------------- CLI
def test_cli_export_writes_files_and_report(tmp_path):
    out = tmp_path / "export"
    result = runner.invoke(app, ["export", "--model", "l0", "--input-size", "64", "-o", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "export.json").read_text())
    assert record["ok"] is True and record["model"] == "efficientvit-sam-l0" and record["input_size"] == 64
    assert record["opset"] == 20 and record["dtype"] == "float32" and record["format"] == "onnx"
    # What onnxruntime runs fast: GELU as one op, the neck's bicubic resizes as MatMuls.
    ops = {n.op_type for n in onnx.load(str(out / "encoder.onnx")).graph.node}
    assert "Gelu" in ops and "Resize" not in ops and "Tanh" not in ops
    assert {"torch", "onnx", "onnxruntime", "evsam"} <= set(record["versions"])
    assert record["shapes"]["decoder"]["inputs"]["point_coords"] == ["N", "K", 2]
    parity = record["parity"]["onnxruntime"]
    for group in ("random", "image"):
        assert set(parity[group]) == {"embeddings", "logits", "iou"}
        assert all(0 <= v < 1e-3 for v in parity[group].values())
    assert [5, 3] in parity["checked_shapes"]["decoder_prompts_points"]  # N, K other than traced
    assert parity["checked_shapes"]["encoder_batch"] == [1, 3]  # batch other than traced
    assert sorted(p.name for p in out.iterdir()) == [
        "decoder.onnx",
        "encoder.onnx",
        "export.json",
    ]  # no temp files
    p = OnnxSamPredictor(out / "encoder.onnx", out / "decoder.onnx")
    p.set_image(np.zeros((64, 64, 3), np.uint8))
    assert p.predict(box=np.array([1, 1, 30, 30]))[0].shape == (3, 64, 64)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "onnx", "--fp16"], "--fp16 applies to --format trt"),
        (["--format", "trt"], "TensorRT"),
        (["--model", "l9"], "unknown model"),
        (["--checkpoint", "missing.pt"], "checkpoint not found"),
        (["--input-size", "100"], "multiple of 32"),
    ],
)
def test_cli_export_errors(tmp_path, args, message):
    if "trt" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the error path is for CPU-only hosts")
    base = ["export", "--model", "l0", "--input-size", "256", "-o", str(tmp_path / "x")]
    line = one_error_line(runner.invoke(app, base + args))
    assert message in line

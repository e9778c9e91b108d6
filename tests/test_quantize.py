"""int8 quantization choices (export/quantize.py, export/sensitivity.py) on hand-built tiny graphs."""

from __future__ import annotations

import math

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from evsam_cli.export.quantize import (  # noqa: E402
    DEFAULT_KEEP_FLOAT,
    GELU_LOOKUP_MAX_RMS,
    fit_gelu_lookup,
    float_nodes,
    gelu_lookups,
)
from evsam_cli.export.sensitivity import activation_stats, sensitive_tensors, tensor_sqnr  # noqa: E402


def _model(nodes, inputs, outputs, initializers=(), domains=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    opsets = [helper.make_opsetid("", 20), *(helper.make_opsetid(d, 1) for d in domains)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 9
    return onnx.shape_inference.infer_shapes(model)


def _value(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def test_attention_matmuls_and_softmax_stay_float_linear_layers_are_quantized():
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["tokens", "w_q"], ["q"], name="linear_q"),  # (B, L, C) x constant
        helper.make_node("MatMul", ["tokens", "w_k"], ["k"], name="linear_k"),
        helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["logits"], name="q_kt"),  # activation x activation
        helper.make_node("Softmax", ["logits"], ["attn"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["attn", "tokens"], ["mixed"], name="attn_v"),
        # (N, C, H, W) x an interpolation matrix (columns of weights summing to 1): a resize
        helper.make_node("MatMul", ["fmap", "resize_w"], ["resized"], name="resize"),
        # (B, H, W, C) x constant: a linear layer on a channels-last map (TinyViT's MLP)
        helper.make_node("MatMul", ["fmap", "w_mlp"], ["hidden"], name="mlp"),
    ]
    model = _model(
        nodes,
        [_value("tokens", [1, 16, 8]), _value("fmap", [1, 8, 4, 4])],
        [_value("mixed", None), _value("resized", None), _value("hidden", None)],
        [
            _init("w_q", rng.normal(size=(8, 8)).astype(np.float32)),
            _init("w_k", rng.normal(size=(8, 8)).astype(np.float32)),
            _init("resize_w", np.full((4, 8), 0.25, np.float32)),
            _init("w_mlp", rng.normal(size=(4, 8)).astype(np.float32)),
        ],
    )
    exclude, _ = float_nodes(model, DEFAULT_KEEP_FLOAT)
    assert set(exclude) == {"q_kt", "softmax", "attn_v", "resize"}
    assert float_nodes(model, ())[0] == []
    exclude, _ = float_nodes(model, ("normalisation", "resize"))
    assert exclude == ["resize"]


def _conv_graph(weights: np.ndarray):
    """X (1, 3, 8, 8) -> 1x1 conv with ``weights`` (3, 3) -> Y."""
    return _model(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
        [_value("x", [1, 3, 8, 8])],
        [_value("y", [1, 3, 8, 8])],
        [_init("w", weights.reshape(3, 3, 1, 1).astype(np.float32))],
    )


DIFFERENCE = np.array([[1, 0, 0], [0, -20, 20], [0, 20, -20]])  # reads x2 - x1, nearly equal channels


@pytest.mark.parametrize(("weights", "sensitive"), [(DIFFERENCE, True), (np.eye(3), False)])
def test_activation_is_sensitive_when_the_next_layer_amplifies_its_noise(tmp_path, weights, sensitive):
    model = _conv_graph(weights)
    path = tmp_path / "conv.onnx"
    onnx.save(model, str(path))
    rng = np.random.default_rng(0)
    inputs = []
    for _ in range(3):
        big, shared, small = rng.normal(size=(3, 1, 1, 8, 8))
        inputs.append(np.concatenate([10 * big, shared, shared + 0.05 * small], axis=1).astype(np.float32))
    stats = activation_stats(path, inputs, "x")
    assert set(stats) == {"x", "y"} and stats["x"].mean_square.shape == (3,)
    sqnr = tensor_sqnr(model, stats)
    # one channel ten times the others leaves them ~22 dB of their own; the difference of two
    # nearly equal channels, scaled up, turns the same rounding noise into more than the signal
    assert sqnr["x"] < 0 if sensitive else sqnr["x"] > 15
    found = sensitive_tensors(model, stats)
    assert ("x" in found) is sensitive
    exclude, _ = float_nodes(model, DEFAULT_KEEP_FLOAT, list(found))
    assert exclude == (["conv"] if sensitive else [])
    assert float_nodes(model, ("normalisation",), list(found))[0] == []


def _gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def test_gelu_lookup_matches_quantized_gelu(tmp_path):
    x_scale, x_zero, y_scale, y_zero = 0.03, 100, 0.02, 9
    slope, _, rms = fit_gelu_lookup(x_scale, x_zero, y_scale, y_zero)
    assert 1.5 <= slope <= 1.8 and rms <= GELU_LOOKUP_MAX_RMS
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q_in"),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xf"], name="dq_in"),
        helper.make_node("Gelu", ["xf"], ["g"], name="gelu"),
        helper.make_node("QuantizeLinear", ["g", "ys", "yz"], ["gq"], name="q_out"),
        helper.make_node("DequantizeLinear", ["gq", "ys", "yz"], ["y"], name="dq_out"),
    ]
    inits = [
        _init("xs", np.float32(x_scale)),
        _init("xz", np.uint8(x_zero)),
        _init("ys", np.float32(y_scale)),
        _init("yz", np.uint8(y_zero)),
    ]
    model = _model(nodes, [_value("x", [1, 4, 16, 16])], [_value("y", [1, 4, 16, 16])], inits)
    assert gelu_lookups(model) == 1
    ops = [n.op_type for n in model.graph.node]
    assert "Gelu" not in ops and ops.count("QLinearSigmoid") == 1 and ops.count("QLinearMul") == 1
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.linspace(-3, 4.5, 4 * 16 * 16, dtype=np.float32).reshape(1, 4, 16, 16)
    y = session.run(None, {"x": x})[0]
    xq = np.clip(np.round(x / x_scale) + x_zero, 0, 255)
    exact = (np.clip(np.round(_gelu(x_scale * (xq - x_zero)) / y_scale) + y_zero, 0, 255) - y_zero) * y_scale
    steps = np.abs(y - exact) / y_scale
    assert steps.max() <= 3 and np.sqrt(np.mean(steps**2)) <= GELU_LOOKUP_MAX_RMS + 0.25
    # a GELU the fit cannot reproduce closely enough is left alone
    assert gelu_lookups(_model(nodes, [_value("x", [1, 4, 16, 16])], [_value("y", None)], inits), 0.0) == 0

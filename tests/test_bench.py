"""evsam bench: JSON schema per engine, paper figures, --all table and plot, errors (no timing thresholds)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from evsam_cli.cli.app import app
from evsam_cli.throughput import (
    GPUS,
    PAPER,
    BenchError,
    device_matches,
    measure,
    paper_figures,
    read_metrics,
    reference_for,
    run_bench,
)

runner = CliRunner()
FAST = ["--input-size", "64", "--warmup", "1", "--iters", "1", "--prompts", "2", "--device", "cpu"]
TOP_KEYS = {
    "model",
    "engine",
    "device",
    "device_name",
    "dtype",
    "batch_size",
    "image_size",
    "encoder",
    "decoder",
    "end_to_end",
    "reference",
}


def check_schema(rec: dict, *, engine: str, prompts: int, batch: int = 1) -> None:
    """DESIGN.md's bench JSON, exactly."""
    assert set(rec) == TOP_KEYS
    assert rec["engine"] == engine and rec["device"] == "cpu" and isinstance(rec["device_name"], str)
    assert rec["dtype"] == "fp32" and isinstance(rec["dtype"], str)
    assert rec["batch_size"] == batch and rec["image_size"] == 64 and isinstance(rec["image_size"], int)
    assert set(rec["encoder"]) == {"images_per_s", "latency_ms"}
    assert set(rec["encoder"]["latency_ms"]) == {"median", "p90"}
    assert set(rec["decoder"]) == {"prompts", "prompts_per_s", "latency_ms"}
    assert rec["decoder"]["prompts"] == prompts and set(rec["decoder"]["latency_ms"]) == {"median", "p90"}
    assert set(rec["end_to_end"]) == {"images_per_s"}
    for value in (
        rec["encoder"]["images_per_s"],
        rec["decoder"]["prompts_per_s"],
        rec["end_to_end"]["images_per_s"],
        rec["encoder"]["latency_ms"]["median"],
    ):
        assert isinstance(value, float) and value > 0
    assert rec["encoder"]["latency_ms"]["p90"] >= rec["encoder"]["latency_ms"]["median"]
    # throughput follows from the median latency
    enc = rec["encoder"]
    assert enc["images_per_s"] == pytest.approx(1000 * batch / enc["latency_ms"]["median"], rel=1e-3)


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


# ---------------------------------------------------------------------------- library
def test_run_bench_torch_schema():
    rec, warnings = run_bench(
        model="l0", engine="torch", device="cpu", input_size=64, batch_size=2, prompts=3, warmup=1, iters=1
    )
    check_schema(rec, engine="torch", prompts=3, batch=2)
    assert rec["model"] == "efficientvit-sam-l0" and rec["reference"] is None and warnings == []


def test_compile_engine_uses_cuda_graphs_on_gpus_only(monkeypatch):
    """``--engine compile`` compiles the encoder and the decode function, with CUDA graphs
    (``mode="reduce-overhead"``) on CUDA; on the CPU in the default mode, with no graph steps."""
    from evsam_cli.models import create_model
    from evsam_cli.throughput.engines import TorchEngine, compile_options

    assert compile_options(torch.device("cuda")) == {"mode": "reduce-overhead"}
    assert compile_options(torch.device("cpu")) == {}
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append(kwargs) or fn)
    steps = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    model = create_model("l0", input_size=64)
    engine = TorchEngine(
        model, device=torch.device("cpu"), dtype="fp32", batch_size=2, prompts=3, compile=True
    )
    assert engine.name == "compile" and calls == [{}, {}] and not engine.cuda_graphs
    masks, iou = engine.end_to_end()
    assert masks.shape[:2] == (3, 3) and iou.shape == (3, 3) and steps == []
    engine.cuda_graphs = True  # as on CUDA: every call to a compiled graph starts a step
    engine.end_to_end()
    assert len(steps) == 1 + 2


def test_torch_engine_decodes_as_the_predictor_does(monkeypatch):
    """On a CPU with two threads, 16 prompts are decoded in two halves on two threads, each
    under inference mode (it is per thread: without it the worker would take the slow autograd
    path), and the halves come back in order."""
    import threading

    from evsam_cli.models import create_model
    from evsam_cli.throughput.engines import TorchEngine

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = create_model("l0", input_size=64)
        engine = TorchEngine(
            model, device=torch.device("cpu"), dtype="fp32", batch_size=1, prompts=16, compile=False
        )
        backend = engine.backend
        whole = backend.decode
        seen = []

        def decode(boxes, multimask_output):
            seen.append((threading.current_thread().name, torch.is_inference_mode_enabled(), boxes.shape[0]))
            return whole(boxes=boxes, multimask_output=multimask_output)

        monkeypatch.setattr(backend, "decode", decode)
        masks, iou = engine.decode()
        with torch.inference_mode():
            ref_masks, ref_iou = model.decode(engine.embedding, boxes=engine.boxes, multimask_output=True)
    finally:
        torch.set_num_threads(before)
    assert sorted(s[2] for s in seen) == [8, 8] and len({s[0] for s in seen}) == 2
    assert all(s[1] for s in seen)
    torch.testing.assert_close(masks, ref_masks, rtol=0, atol=1e-4)
    torch.testing.assert_close(iou, ref_iou, rtol=0, atol=1e-5)


def test_measure_never_times_warmup_calls():
    calls = []
    timing = measure(lambda: calls.append(1), warmup=3, iters=4)
    assert len(calls) == 7 and len(timing.seconds) == 4
    with pytest.raises(ValueError, match="first call is never timed"):
        measure(lambda: None, warmup=0, iters=1)


def test_paper_figures_in_one_place():
    assert PAPER["efficientvit-sam-l0"].a100_images_per_s == 762
    assert [PAPER[f"efficientvit-sam-{m}"].a100_images_per_s for m in ("l1", "l2", "xl0", "xl1")] == [
        638,
        538,
        278,
        182,
    ]
    assert PAPER["sam-vit-h"].a100_images_per_s == 11 and PAPER["sam-vit-h"].coco_map == 46.5
    assert [PAPER[f"efficientvit-sam-{m}"].orin_latency_ms for m in ("l0", "l1", "l2", "xl0", "xl1")] == [
        8.2,
        10.2,
        12.9,
        22.5,
        37.2,
    ]
    assert [PAPER[f"efficientvit-sam-{m}"].coco_map for m in ("l0", "l1", "l2", "xl0", "xl1")] == [
        45.7,
        46.2,
        46.6,
        47.5,
        47.8,
    ]
    ref = reference_for("efficientvit-sam-xl1", "a100")
    assert ref is not None and set(ref) == {"source", "gpu", "images_per_s"} and ref["images_per_s"] == 182
    orin = reference_for("efficientvit-sam-l0", "orin")
    assert orin is not None and orin["images_per_s"] == pytest.approx(1000 / 8.2, abs=0.1)
    assert reference_for("sam-vit-b", "a100") is None and paper_figures("sam-vit-b") is None
    assert device_matches("a100", "NVIDIA A100-SXM4-80GB") and not device_matches(
        "a100", "NVIDIA H100 80GB HBM3"
    )
    assert device_matches("orin", "Orin") and set(GPUS) == {"a100", "orin"}


def test_read_metrics(tmp_path):
    det = tmp_path / "det.json"
    det.write_text(json.dumps({"dataset": "coco", "model": "l1", "detector": "vitdet", "segm": {"AP": 46.0}}))
    box = tmp_path / "box.json"
    box.write_text(
        json.dumps(
            {"dataset": "coco", "model": "efficientvit-sam-l0", "prompt": "box", "miou": {"all": 79.1}}
        )
    )
    got = read_metrics([det, box])
    assert got["efficientvit-sam-l1"][0] == 46.0 and got["efficientvit-sam-l0"][0] == 79.1
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    from evsam_cli.errors import DataError

    with pytest.raises(DataError, match="malformed"):
        read_metrics([bad])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"engine": "torch", "dtype": "fp16"}, "fp16 on the CPU"),
        ({"engine": "onnxruntime", "dtype": "bf16"}, "float32 graphs"),
        ({"engine": "torch", "gpu": "v100"}, "no paper figures"),
        ({"engine": "torch", "warmup": 0}, "first call is never timed"),
        ({"engine": "tvm"}, "unknown engine"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(BenchError, match=message):
        run_bench(model="l0", device="cpu", input_size=64, iters=1, **kwargs)


# ---------------------------------------------------------------------------- CLI
def test_cli_bench_onnxruntime_json(tmp_path):
    out = tmp_path / "bench.json"
    result = runner.invoke(
        app, ["bench", "--model", "l0", "--engine", "onnxruntime", *FAST, "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    rec = json.loads(out.read_text())
    check_schema(rec, engine="onnxruntime", prompts=2)
    assert "prompt encoder + mask decoder" in result.stdout


def test_cli_bench_gpu_reference_and_warning(tmp_path):
    out = tmp_path / "bench.json"
    result = runner.invoke(
        app, ["bench", "--model", "l0", "--engine", "torch", *FAST, "--gpu", "a100", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    rec = json.loads(out.read_text())
    check_schema(rec, engine="torch", prompts=2)
    assert rec["reference"]["gpu"] == "a100" and rec["reference"]["images_per_s"] == 762
    assert "Warning:" in result.stderr and "not comparable" in result.stderr  # a CPU is not an A100
    assert "paper (a100)" in result.stdout


def test_cli_bench_all_table_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    plot, out = tmp_path / "zoo.png", tmp_path / "zoo.json"
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"model": "l0", "dataset": "coco", "segm": {"AP": 40.0}}))
    args = [
        "bench",
        "--all",
        "--models",
        "l0",
        *FAST,
        "--plot",
        str(plot),
        "--metrics",
        str(metrics),
        "--json",
        str(out),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = json.loads(out.read_text())
    assert [r["model"] for r in payload["results"]] == ["efficientvit-sam-l0"]
    check_schema(payload["results"][0], engine="torch", prompts=2)
    assert (
        "params" in result.stdout and "MACs" in result.stdout and "45.7" in result.stdout
    )  # paper mAP column


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="this machine has a GPU; the error path is for CPU-only hosts"
)
def test_cli_bench_trt_without_gpu_is_one_error_line():
    line = one_error_line(runner.invoke(app, ["bench", "--model", "l0", "--engine", "trt", "--iters", "1"]))
    assert "GPU" in line or "tensorrt" in line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--engine", "torch", "--dtype", "fp16", "--device", "cpu"], "fp16 on the CPU"),
        (["--gpu", "v100"], "no paper figures"),
        (["--engine", "onnxruntime", "--exported", "no/such/folder"], "exported files not found"),
        (["--model", "nope"], "unknown model"),
    ],
)
def test_cli_bench_errors(args, message):
    base = ["bench", "--model", "l0", "--input-size", "64", "--iters", "1", "--warmup", "1"]
    assert message in one_error_line(runner.invoke(app, base + args))

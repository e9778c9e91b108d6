"""Export runtimes are a registry: the CLI choices, the export pipeline and bench read it."""

from __future__ import annotations

import pytest

from evsam_cli.cli.bench import EngineName
from evsam_cli.cli.export import Format
from evsam_cli.errors import EvsamError
from evsam_cli.export import runtimes
from evsam_cli.export.runtimes import RUNTIMES, ExportRuntime, register_runtime, runtime_for_format
from evsam_cli.throughput import TORCH_ENGINES, engine_names


def test_cli_choices_are_the_registry():
    assert [e.value for e in Format] == [r.format for r in RUNTIMES.values()]
    assert [e.value for e in EngineName] == [*TORCH_ENGINES, *RUNTIMES]
    assert set(RUNTIMES) == {"onnxruntime", "trt"}


def test_unknown_names_list_the_registered_ones():
    with pytest.raises(EvsamError, match="use one of onnx, trt"):
        runtime_for_format("tflite")
    with pytest.raises(EvsamError, match="onnxruntime, trt"):
        runtimes.get_runtime("tvm")


def test_precision_checks_come_from_the_runtime():
    with pytest.raises(EvsamError, match="float32 graphs"):
        RUNTIMES["onnxruntime"].check(precision="fp16")
    RUNTIMES["onnxruntime"].check(precision="fp32")


def test_a_new_runtime_is_one_class_and_one_registration(tmp_path):
    saved = dict(RUNTIMES)
    try:

        @register_runtime
        class Toy(ExportRuntime):
            name = "toy"
            format = "toyfmt"
            suffix = ".toy"

        assert engine_names()[-1] == "toy" and runtime_for_format("toyfmt").name == "toy"
        with pytest.raises(EvsamError, match="exported files not found"):
            RUNTIMES["toy"].files(tmp_path)
        with pytest.raises(ValueError, match="already exported"):

            @register_runtime
            class Clash(ExportRuntime):
                name = "toy2"
                format = "toyfmt"
                suffix = ".toy"
    finally:
        RUNTIMES.clear()
        RUNTIMES.update(saved)

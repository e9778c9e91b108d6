"""The engines ``evsam bench`` times, behind one small interface.

Each engine prepares its inputs once (a random normalised image batch, one image embedding and
P random box prompts in the prompt frame) and exposes three argument-free calls: ``encode``
(the batch through the image encoder), ``decode`` (P prompts through prompt encoder + mask
decoder to low-res logits and IoU) and ``end_to_end`` (encode the batch, then decode P prompts
per image). Only the calls are timed, never input preparation or host transfers of inputs.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EvsamError
from ..export.errors import ExportError
from ..export.runtimes import RUNTIMES, get_runtime
from .names import TORCH_ENGINES, engine_names


class BenchError(EvsamError):
    """A benchmark setting that cannot run (an engine/dtype/device combination)."""


def random_boxes(count: int, *, frame: int = 1024, seed: int = 0) -> np.ndarray:
    """(count, 4) xyxy boxes inside a ``frame`` x ``frame`` prompt frame, at least 16 px wide."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, frame - 64, size=(count, 2))
    wh = rng.uniform(16, frame / 2, size=(count, 2))
    return np.concatenate([xy, np.minimum(xy + wh, frame - 1)], axis=1).astype(np.float32)


def box_points(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 4) boxes -> decoder-graph points (N, 2, 2) and labels (N, 2) = (2, 3)."""
    n = boxes.shape[0]
    return boxes.reshape(n, 2, 2).astype(np.float32), np.tile(np.array([[2.0, 3.0]], np.float32), (n, 1))


class Engine:
    name = "engine"
    cuda = False  # time with CUDA events

    def __init__(self, *, batch_size: int, prompts: int) -> None:
        self.batch_size = batch_size
        self.prompts = prompts

    def encode(self) -> Any:
        """The prepared image batch through the encoder -> (B, 256, 64, 64) embeddings."""
        raise NotImplementedError

    def decode(self, embedding: Any = None) -> Any:
        """P prompts against ``embedding`` (1, 256, 64, 64), default the prepared one."""
        raise NotImplementedError

    def end_to_end(self) -> Any:
        """Encode the batch, then decode P prompts against each image's own embedding."""
        embeddings = self._hold(self.encode())
        for i in range(self.batch_size):
            out = self.decode(embeddings[i : i + 1])
        return out

    def _hold(self, embeddings: Any) -> Any:
        """The encoder's output as ``end_to_end`` keeps it while the decoder runs."""
        return embeddings

    def close(self) -> None:
        """Release temporary files (exported graphs, engines)."""


def compile_options(device: Any) -> dict[str, Any]:
    """``torch.compile`` keyword arguments for ``device``: on CUDA ``mode="reduce-overhead"``,
    which replays each compiled graph as one CUDA graph (one launch instead of hundreds of
    kernel launches, what bounds small batches and the decoder); on the CPU the default mode
    (CUDA graphs do not apply)."""
    return {"mode": "reduce-overhead"} if device.type == "cuda" else {}


class TorchEngine(Engine):
    """Eager PyTorch (``compile=False``) or ``torch.compile`` on the zoo model (with CUDA graphs
    on a GPU, see ``compile_options``)."""

    def __init__(
        self, model: Any, *, device: Any, dtype: str, batch_size: int, prompts: int, compile: bool
    ) -> None:
        import torch

        super().__init__(batch_size=batch_size, prompts=prompts)
        self.name = "compile" if compile else "torch"
        self.cuda = device.type == "cuda"
        self.torch = torch
        self.device = device
        self.model = model.to(device).eval()
        # Eager runs the predictor's reduced-precision backend (``accel/precision.py``);
        # torch.compile traces the model's modules under autocast.
        self.autocast_dtype = (
            {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype] if compile else None
        )
        gen = torch.Generator().manual_seed(0)
        size = model.input_size
        self.images = torch.randn(batch_size, 3, size, size, generator=gen).to(device)
        self.boxes = torch.from_numpy(random_boxes(prompts)).to(device)
        from ..accel.backend import select_backend
        from ..accel.encoder import optimize_encoder

        # Eager: the predictor's decode backend, with the inference encoder it uses (BatchNorm
        # folded, channels-last, on CPU its kernels and matmul resizes) and on a CPU the streamed
        # decoder in two threads. Under torch.compile the model's own modules are traced and
        # inductor fuses for itself: plain convolutions and resizes, no per-image state.
        self.cuda_graphs = compile and self.cuda  # outputs are copied before reuse (``_hold``)
        if compile:
            encoder = torch.compile(
                optimize_encoder(model.image_encoder, cpu_kernels=False, matmul_resize=False),
                **compile_options(device),
            )

            def one_pass(embedding: Any, boxes: Any) -> Any:
                return model.decode(embedding, boxes=boxes, multimask_output=True)

            decode = torch.compile(one_pass, **compile_options(device))
        else:
            backend = self.backend = select_backend(model, dtype=dtype)
            context = self._context  # inference mode and autocast are per thread
            encoder = backend.encode

            def decode(embedding: Any, boxes: Any) -> Any:
                """As the predictor decodes (``SamPredictor.predict_batch``): one pass, on a CPU
                two halves of the prompts on two threads."""
                if embedding is not backend.embedding:
                    backend.set_embedding(embedding)

                def half(sl: slice) -> Any:
                    with context():
                        return backend.decode(boxes=boxes[sl], multimask_output=True)

                parts = backend.map_passes(half, len(boxes), len(boxes))
                return tuple(torch.cat(part) for part in zip(*parts, strict=True))

        self._encoder = encoder
        self._decode = decode
        with self._context():
            self.embedding = (model.image_encoder if compile else self.backend.encode)(
                self.images[:1]
            ).clone()

    def _context(self) -> Any:
        import contextlib

        stack = contextlib.ExitStack()
        stack.enter_context(self.torch.inference_mode())
        if self.autocast_dtype is not None:
            stack.enter_context(self.torch.autocast(self.device.type, dtype=self.autocast_dtype))
        return stack

    def _step(self) -> None:
        if self.cuda_graphs:
            self.torch.compiler.cudagraph_mark_step_begin()

    def encode(self) -> Any:
        self._step()
        with self._context():
            return self._encoder(self.images)

    def decode(self, embedding: Any = None) -> Any:
        self._step()
        with self._context():
            return self._decode(self.embedding if embedding is None else embedding, self.boxes)

    def _hold(self, embeddings: Any) -> Any:
        # under CUDA graphs the decoder's graph may reuse the encoder output's memory
        return embeddings.clone() if self.cuda_graphs else embeddings


class OnnxRuntimeEngine(Engine):
    """onnxruntime sessions on ``encoder.onnx`` / ``decoder.onnx`` (float32 graphs, or an int8
    encoder)."""

    name = "onnxruntime"

    def __init__(self, encoder: Path, decoder: Path, *, device: str, batch_size: int, prompts: int) -> None:
        from ..export.runtime import graph_metadata, open_session

        super().__init__(batch_size=batch_size, prompts=prompts)
        self.encoder_path, self.decoder_path = Path(encoder), Path(decoder)
        self.encoder = open_session(encoder, device=device)
        self.decoder = open_session(decoder, device=device)
        size = self.encoder.get_inputs()[0].shape[-1]
        rng = np.random.default_rng(0)
        self.images = rng.standard_normal((batch_size, 3, size, size)).astype(np.float32)
        self.embedding = self.encoder.run(None, {"images": self.images[:1]})[0]
        coords, labels = box_points(random_boxes(prompts))
        rows = prompts if graph_metadata(self.decoder).get("mask_batch") == "prompts" else 1
        self.feeds = {
            "image_embeddings": self.embedding,
            "point_coords": coords,
            "point_labels": labels,
            "mask_input": np.zeros((rows, 1, 256, 256), np.float32),
            "has_mask_input": np.zeros(rows, np.float32),
        }

    def encode(self) -> Any:
        return self.encoder.run(None, {"images": self.images})[0]

    def decode(self, embedding: Any = None) -> Any:
        feeds = self.feeds if embedding is None else {**self.feeds, "image_embeddings": embedding}
        return self.decoder.run(None, feeds)


class TensorRTEngine(Engine):
    """Serialized TensorRT engines run on torch CUDA tensors (inputs prepared on the GPU)."""

    name = "trt"
    cuda = True

    def __init__(
        self, encoder: Path, decoder: Path, *, batch_size: int, prompts: int, mask_batch: str
    ) -> None:
        import torch

        from ..export.tensorrt import TrtRunner

        super().__init__(batch_size=batch_size, prompts=prompts)
        self.encoder = TrtRunner(encoder)
        self.decoder = TrtRunner(decoder)
        size = self.encoder.input_spec("images").shape[-1]
        gen = torch.Generator().manual_seed(0)
        self.images = torch.randn(batch_size, 3, size, size, generator=gen).cuda()
        self.embedding = self.encoder({"images": self.images[:1]})["image_embeddings"].clone()
        coords, labels = box_points(random_boxes(prompts))
        rows = prompts if mask_batch == "prompts" else 1
        self.feeds = {
            "image_embeddings": self.embedding,
            "point_coords": torch.from_numpy(coords).cuda(),
            "point_labels": torch.from_numpy(labels).cuda(),
            "mask_input": torch.zeros(rows, 1, 256, 256, device="cuda"),
            "has_mask_input": torch.zeros(rows, device="cuda"),
        }
        torch.cuda.synchronize()

    def encode(self) -> Any:
        return self.encoder({"images": self.images})["image_embeddings"]

    def decode(self, embedding: Any = None) -> Any:
        feeds = self.feeds if embedding is None else {**self.feeds, "image_embeddings": embedding}
        return self.decoder(feeds)


def make_engine(
    engine: str,
    *,
    model: Any,
    checkpoint: str | os.PathLike[str] | None,
    device: Any,
    dtype: str,
    batch_size: int,
    prompts: int,
    exported: Path | None = None,
    progress: Any = None,
) -> Engine:
    """Build the engine ``engine`` for ``model`` (a built ``Sam``), exporting to a temp folder if needed."""
    if engine in TORCH_ENGINES:
        return TorchEngine(
            model,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            prompts=prompts,
            compile=engine == "compile",
        )
    if engine not in RUNTIMES:
        raise BenchError(f"unknown engine {engine!r}: use one of {', '.join(engine_names())}")
    runtime = get_runtime(engine)
    if dtype == "int8" and runtime.format != "onnx":
        raise BenchError(
            "int8 is an onnxruntime quantization of encoder.onnx: use engine onnxruntime"
        ).naming("engine")
    try:  # an int8 export is float32 graphs with a quantized encoder
        runtime.check(precision="fp32" if dtype == "int8" else dtype, device_type=device.type)
    except ExportError as exc:
        raise BenchError(str(exc)) from None
    folder, tmp = _exported_folder(
        exported,
        model,
        checkpoint,
        fmt=runtime.format,
        dtype=dtype,
        batch_size=batch_size,
        prompts=prompts,
        progress=progress,
    )
    try:
        eng = runtime.bench_engine(folder, device=device, batch_size=batch_size, prompts=prompts)
    except ExportError as exc:  # files missing from the user's folder
        if tmp:
            tmp.cleanup()
        raise BenchError(str(exc)) from None
    except BaseException:
        if tmp:
            tmp.cleanup()
        raise
    eng.close = tmp.cleanup if tmp else eng.close  # type: ignore[method-assign]
    return eng


def _exported_folder(
    exported: Path | None,
    model: Any,
    checkpoint: Any,
    *,
    fmt: str,
    dtype: str,
    batch_size: int,
    prompts: int,
    progress: Any,
) -> tuple[Path, tempfile.TemporaryDirectory[str] | None]:
    """The user's export folder, or a fresh throwaway export (no parity check) in a temp folder."""
    if exported is not None:
        return Path(exported), None
    from ..export.pipeline import export_model

    tmp = tempfile.TemporaryDirectory(prefix="evsam-bench-")
    try:
        export_model(
            model=model.name,
            checkpoint=checkpoint,
            output_dir=tmp.name,
            fmt=fmt,
            precision=dtype if fmt == "trt" else "fp32",
            dtype="int8" if dtype == "int8" else "fp32",
            input_size=model.input_size,
            max_batch=batch_size,
            max_prompts=max(prompts, 1),
            opt_prompts=max(prompts, 1),
            check=False,
            progress=progress,
        )
    except BaseException:
        tmp.cleanup()
        raise
    return Path(tmp.name), tmp
